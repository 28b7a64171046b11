"""``distbert key``: a fresh session key for a run with external workers."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from distbert.errors import UserError
from distbert.util.fs import atomic_write_text


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("key", help="make a session key (256 bits) for rank 0 and external workers",
                       description="Write a fresh session key, readable by its owner only. Give it to rank 0 "
                                   "as DISTBERT_SESSION_KEY=$(cat FILE) and to `distbert worker --key-file FILE`.")
    p.add_argument("--out", help="file to create (mode 0600); without it the key goes to stdout")
    p.add_argument("--force", action="store_true", help="replace an existing --out file")
    p.set_defaults(handler=cmd_key)


def cmd_key(args: argparse.Namespace) -> int:
    from distbert.wire.keys import new_session_key

    key = new_session_key()
    if args.out is None:
        print(key)
        return 0
    out = Path(args.out)
    if out.exists() and not args.force:
        raise UserError(f"--out {out} exists; pass --force to replace it (workers holding the old key "
                        "will no longer connect)")
    if not out.parent.is_dir():
        raise UserError(f"--out {out}: folder {out.parent} does not exist")
    atomic_write_text(out, key + "\n")  # through mkstemp: mode 0600
    print(f"wrote a 256-bit session key to {out}", file=sys.stderr)
    return 0
