"""qmoe's Gradio web UI (``qmoe ui``): one module per tab, assembled by :mod:`qmoe_app.main`.

The folder is `app/` in the repository and installs as the package ``qmoe_app`` (pyproject.toml says why).

It uses only qmoe's public API and the run-directory contract (recipe.yaml, status.json, metrics.jsonl,
train.log, adapter/, eval.json), so it can watch runs started from the command line as well.
"""
