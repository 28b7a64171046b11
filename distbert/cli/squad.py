"""``distbert squad features`` and ``distbert accuracy``: the SQuAD data path on the command line.

``register(subparsers)`` adds both; each handler is ``args.handler(args) -> int`` and lets
:class:`~distbert.errors.UserError` propagate for the main CLI to print. ``accuracy`` prints exactly
the official line ``{"exact_match": X, "f1": Y}`` on stdout; coverage and the bert-99 / bert-99.9
PASS/FAIL verdicts go to stderr. Bad input writes nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from distbert.data.squad.accuracy import DTYPES, score_log, write_accuracy_txt, write_predictions_json
from distbert.data.squad.features import FeatureStore, load_features
from distbert.errors import UserError


def register(subparsers: Any) -> None:
    """Add ``squad features`` and ``accuracy`` to ``subparsers`` (from ``add_subparsers``)."""
    squad = subparsers.add_parser("squad", help="SQuAD data tools (features export)",
                                  description="SQuAD v1.1 data tools.")
    squad_sub = squad.add_subparsers(dest="squad_command", required=True)
    p = squad_sub.add_parser(
        "features", help="featurize SQuAD (cached) and export the model inputs as .npz",
        description="Featurize the SQuAD dev set exactly as the MLPerf reference (384/128/64), using "
                    "the content-addressed feature cache, and export input_ids, input_mask and "
                    "segment_ids (int32 [N, 384], QSL order) to an .npz file.")
    _add_data_args(p)
    p.add_argument("--out", type=Path, required=True, metavar="FILE.npz", help="the .npz to write")
    p.set_defaults(handler=cmd_squad_features)

    p = subparsers.add_parser(
        "accuracy", help="score a LoadGen mlperf_log_accuracy.json (SQuAD v1.1 EM/F1)",
        description="Score a LoadGen accuracy log like accuracy-squad.py + evaluate_v1.1.py. Prints "
                    "the official line on stdout; PASS/FAIL for bert-99 and bert-99.9 on stderr.")
    p.add_argument("--log", type=Path, required=True, metavar="FILE",
                   help="mlperf_log_accuracy.json of an accuracy run (untruncated)")
    _add_data_args(p)
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32",
                   help="dtype of the logged logits (default float32, as the reference SUTs)")
    p.add_argument("--output-transposed", action="store_true",
                   help="logits are logged as [2, L] (start row, end row) instead of [L, 2]")
    p.add_argument("--out", type=Path, metavar="FILE", help="also write the line to FILE (accuracy.txt)")
    p.add_argument("--predictions", type=Path, metavar="FILE",
                   help="also write the predictions (question id -> answer) as JSON")
    p.set_defaults(handler=cmd_accuracy)


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", type=Path, metavar="FILE",
                   help="dev-v1.1.json (default: DISTBERT_DATA_DIR, else the download cache)")
    p.add_argument("--vocab", type=Path, metavar="FILE",
                   help="BERT vocab.txt (default: DISTBERT_DATA_DIR, else the download cache)")
    p.add_argument("--cache-dir", type=Path, metavar="DIR",
                   help="feature cache root (default: DISTBERT_CACHE or ~/.cache/distbert)")


def _store(args: argparse.Namespace) -> FeatureStore:
    from distbert.data.artifacts import resolve_squad

    dataset, vocab = resolve_squad(args.dataset, args.vocab)
    return load_features(Path(dataset), Path(vocab), cache_dir=args.cache_dir)


def _check_writable(path: Path, flag: str) -> None:
    if not path.parent.is_dir():
        raise UserError(f"{flag} {path}: folder {path.parent} does not exist: create it or pick another path")


def cmd_squad_features(args: argparse.Namespace) -> int:
    """Export the cached features' model inputs to ``args.out`` (written atomically)."""
    _check_writable(args.out, "--out")
    store = _store(args)
    fd, tmp = tempfile.mkstemp(prefix=f".{args.out.name}.", dir=args.out.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, input_ids=np.asarray(store.input_ids), input_mask=np.asarray(store.input_mask),
                     segment_ids=np.asarray(store.segment_ids))
        os.replace(tmp, args.out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    print(f"{args.out}: {len(store)} features x {store.input_ids.shape[1]} tokens (cache {store.path})")
    return 0


def cmd_accuracy(args: argparse.Namespace) -> int:
    """Score ``args.log``; stdout gets the official line only."""
    for path, flag in ((args.out, "--out"), (args.predictions, "--predictions")):
        if path is not None:
            _check_writable(path, flag)
    if not args.log.is_file():
        raise UserError(f"accuracy log {args.log} does not exist: pass the mlperf_log_accuracy.json "
                        f"of an accuracy run with --log")
    store = _store(args)
    result = score_log(args.log, store, dtype=args.dtype, transposed=args.output_transposed)
    if args.out is not None:
        write_accuracy_txt(result, args.out)
    if args.predictions is not None:
        write_predictions_json(result, args.predictions)
    print(result.official_line(), flush=True)
    print(result.coverage_line(), file=sys.stderr)
    for line in result.verdicts():
        print(line, file=sys.stderr)
    return 0
