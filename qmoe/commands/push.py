"""``qmoe push ADAPTER_OR_RUN_DIR REPO_ID``: upload an adapter (with its model card) to the Hugging Face Hub."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "path", metavar="ADAPTER_OR_RUN_DIR", help="an adapter folder, or a run directory (its adapter/)"
    )
    parser.add_argument("repo_id", metavar="REPO_ID", help="hub repository to push to: owner/name (created if missing)")
    parser.add_argument("--private", action="store_true", help="create the repository as private (a new one only)")
    parser.add_argument("--revision", help="branch to push to (created if missing; default: main)")
    parser.add_argument("--message", help="commit message (default: 'qmoe: upload <method> adapter')")


def run(args: argparse.Namespace) -> int:
    from ..hub import endpoint, push_adapter

    url = push_adapter(
        args.path, args.repo_id, private=args.private, revision=args.revision, commit_message=args.message
    )
    print(f"pushed {args.path} to {args.repo_id} on {endpoint()}: {url}")
    return 0
