"""``qmoe chat ADAPTER_OR_RUN_DIR``: streaming terminal chat; ``--routing`` shows each token's top experts."""

from __future__ import annotations

import argparse
import sys

from ..errors import UsageError
from . import add_dequantize_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "path",
        nargs="?",
        metavar="ADAPTER_OR_RUN_DIR",
        help="run directory, adapter folder or hub repo id of an adapter (omit to chat with the base model)",
    )
    parser.add_argument("--revision", help="branch, tag or commit of a hub adapter repo (default: main)")
    parser.add_argument("--base", help="base model source (default: from the run's recipe or the adapter folder)")
    parser.add_argument("--routing", action="store_true", help="after each reply, print every token's top experts")
    parser.add_argument(
        "--layer",
        help="routed layer to show (default: the middle one); a suffix such as layers.10.mlp.down_proj is enough",
    )
    parser.add_argument("--top", type=int, default=2, help="experts shown per token (default 2)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="longest reply (default 256)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--system", help="system message")
    add_dequantize_argument(parser)
    parser.add_argument(
        "--merge",
        action="store_true",
        help="fold a lora adapter into the weights (the merged layers are dense: base-model speed on a GPU or "
        "over a dequantised copy; on CPUs with bitsandbytes' bf16 4-bit kernel the unmerged adapter is faster); "
        "mixtures cannot be merged",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="compile the decode step (torch.compile, static KV cache): faster replies after the first, which "
        "waits for the compilation (about a minute on a CPU), except with a moelora adapter (measured on CPU: "
        "BENCHMARKS.md); --routing replies run uncompiled",
    )


def pick_layer(routed: list[str], wanted: str | None) -> str:
    if not routed:
        raise UsageError("--routing needs a routed adapter (moelora, loramoe or loracoe); this one has no router")
    if wanted is None:
        return routed[len(routed) // 2]
    matches = [name for name in routed if name == wanted or name.endswith(wanted)]
    if not matches:
        raise UsageError(f"--layer {wanted!r} matches no routed layer; e.g. {routed[0]} ... {routed[-1]}")
    return matches[0]


def run(args: argparse.Namespace) -> int:
    from ..chat import load_chat_model, stream_reply, top_experts

    chat = load_chat_model(
        args.path,
        base_source=args.base,
        revision=args.revision,
        dequantize=args.dequantize,
        merge=args.merge,
        compile=args.compile,
    )
    layer = pick_layer(chat.routed_layers, args.layer) if args.routing else None
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print(
        f"chatting with {chat.source}"
        + (f" + {chat.adapter_dir}" if chat.adapter_dir else "")
        + (" (merged)" if chat.merged else "")
        + ("; compiled decode step" if chat.compiled else "")
        + ("; 4-bit weights dequantised once in RAM (--dequantize off keeps them 4-bit)" if chat.dequantized else "")
        + (f"; routing of {layer}" if layer else "")
        + ". Empty line or Ctrl-D quits.",
        file=sys.stderr,
    )
    while True:
        try:
            prompt = input("you> ").strip()
        except EOFError:
            break
        if not prompt:
            break
        messages.append({"role": "user", "content": prompt})
        print("model> ", end="", flush=True)
        final = {}
        for event in stream_reply(chat, messages, args.max_new_tokens, args.temperature, trace=layer is not None):
            if "done" in event:
                final = event
            else:
                print(event["text"], end="", flush=True)
        print()
        messages.append({"role": "assistant", "content": final.get("text", "")})
        if layer is not None and layer in final.get("routing", {}):
            print(f"routing at {layer} (expert:weight):")
            for token, experts in zip(final["tokens"], top_experts(final["routing"][layer], args.top), strict=False):
                shown = "  ".join(f"{e}:{w:.2f}" for e, w in experts)
                print(f"  {token!r:>16}  {shown}")
    return 0
