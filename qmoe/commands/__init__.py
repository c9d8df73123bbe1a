"""One module per `qmoe` subcommand (see qmoe/cli.py), and the options several of them share."""

from __future__ import annotations

import argparse


def add_dequantize_argument(parser: argparse.ArgumentParser) -> None:
    """``--dequantize`` of the commands that generate (chat, eval): one definition, so they never drift."""
    parser.add_argument(
        "--dequantize",
        choices=["auto", "on", "off"],
        default="auto",
        help="keep a dequantised copy of the frozen 4-bit weights instead of dequantising them for every token "
        "(same numerics); auto (default): on CPU when it fits in free RAM and bitsandbytes lacks its bf16 CPU kernel",
    )
