"""``qmoe merge ADAPTER_OR_RUN_DIR OUT``: fold a lora adapter into its base model and write OUT, a plain
transformers model folder (weights in the compute dtype, tokenizer included) that
``AutoModelForCausalLM.from_pretrained(OUT)`` loads without qmoe or bitsandbytes.

The frozen weights are the 4-bit ones the adapter was trained against, dequantised: the merged model computes
what base + adapter computed, up to float rounding. Mixtures (moelora, loracoe, loramoe) are refused: their
routing depends on the input, so their update is not one weight matrix.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from ..errors import UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", metavar="ADAPTER_OR_RUN_DIR", help="a run directory or a lora adapter folder")
    parser.add_argument("out", metavar="OUT", help="folder to write the merged model to (must not exist)")
    parser.add_argument("--base", help="base model source (default: from the run's recipe or the adapter folder)")
    parser.add_argument(
        "--device", choices=["auto", "cpu", "cuda"], default="auto", help="where to merge (default: GPU if present)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")


def merge_to_folder(path: str | Path, out: str | Path, base_source: str | None = None, device: str = "auto") -> Path:
    """Merge the lora adapter at ``path`` into its base and save the plain model to ``out`` (staged, renamed)."""
    from ..chat import load_chat_model, resolve_adapter
    from ..inference import drop_quantization_config
    from ..io import replace_dir
    from ..serialization import AdapterError, read_adapter_config

    out = Path(out)
    _, _, _, adapter_dir = resolve_adapter(path, base_source)
    try:
        config, _, _ = read_adapter_config(adapter_dir)
    except AdapterError as exc:
        raise UsageError(str(exc)) from None
    if config.method != "lora":  # before loading anything: say why at once
        raise UsageError(
            f"{adapter_dir} is a {config.method} adapter: its experts are mixed by input-dependent routing, so "
            "its update is not one fixed weight matrix and cannot be merged (only lora adapters merge)"
        )
    chat = load_chat_model(path, base_source=base_source, device=device, dequantize="on", merge=True)
    model = chat.model
    drop_quantization_config(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(staging)
        chat.tokenizer.save_pretrained(staging)
        replace_dir(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise UsageError(f"{out} exists; pass --overwrite to replace it or choose another OUT")
    merge_to_folder(args.path, out, args.base, args.device)
    print(f"wrote {out} (load it with AutoModelForCausalLM.from_pretrained({str(out)!r}))", file=sys.stderr)
    return 0
