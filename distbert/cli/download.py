"""``distbert download squad|model``: fetch the official MLPerf BERT files into the cache.

``squad`` fetches dev-v1.1.json and vocab.txt; ``model`` fetches the model of ``--format`` (plus
``bert_config.json`` for ``pytorch``). A verified local copy (``--dest`` if given, else
``DISTBERT_DATA_DIR`` or the cache) is kept and reported as already present unless ``--force``.
Errors are :class:`~distbert.errors.UserError` lines for the CLI to print.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from distbert.data import artifacts


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``download`` subcommand to ``subparsers`` (from ``add_subparsers``); its handler is
    ``args.handler(args) -> int``."""
    p = subparsers.add_parser(
        "download", help="download the official SQuAD dev set, vocab or MLPerf BERT model",
        description="Download official MLPerf BERT artifacts (resumable, checksum-verified) into the cache "
                    "(DISTBERT_CACHE, default ~/.cache/distbert) or --dest.")
    p.add_argument("what", choices=("squad", "model"),
                   help="squad: dev-v1.1.json + vocab.txt; model: the --format model")
    p.add_argument("--format", choices=tuple(artifacts.MODEL_ARTIFACTS), default="onnx",
                   help="model format (default onnx: the fp32 bert-99.9 starting weights)")
    p.add_argument("--dest", type=Path, metavar="DIR", help="download into DIR instead of the cache")
    p.add_argument("--force", action="store_true", help="download again even if a verified copy exists")
    p.add_argument("--mirror", metavar="URL",
                   help="fetch <URL>/<file name> instead of the official URLs (default: DISTBERT_MIRROR)")
    p.set_defaults(handler=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Download what ``args`` asks for, print one line per file saying where it is; return 0."""
    names = ["squad-dev", "vocab"] if args.what == "squad" else [artifacts.MODEL_ARTIFACTS[args.format]]
    for name in names:
        art = artifacts.ARTIFACTS[name]
        found = None if args.force else artifacts.present(art, args.dest)
        if found is not None:
            print(f"{art.filename}: already present at {found}")
            if name == "model-pytorch":
                try:
                    print(f"bert_config.json: {artifacts.write_bert_config(found.parent)}")
                except OSError as e:   # e.g. a read-only team copy in DISTBERT_DATA_DIR
                    print(f"bert_config.json: cannot write it beside the model ({e.strerror})")
            continue
        path = artifacts.download(art, args.dest, base_url_override=args.mirror, force=args.force)
        print(f"{art.filename}: downloaded to {path}")
        if name == "model-pytorch":
            print(f"bert_config.json: {path.parent / 'bert_config.json'}")
    return 0
