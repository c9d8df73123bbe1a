"""qmoe's Gradio web UI (``qmoe ui``): one module per tab, assembled by :mod:`app.main`.

It uses only qmoe's public API and the run-directory contract (recipe.yaml, status.json, metrics.jsonl,
train.log, adapter/, eval.json), so it can watch runs started from the command line as well.
"""
