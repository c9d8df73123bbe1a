"""The ``qmoe`` command. Subcommands are added by the pipeline (finetune, eval, chat), bench and ui."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: qmoe {finetune,eval,chat,bench,ui} ...")
        return 0
    print(f"qmoe: unknown command {argv[0]!r}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
