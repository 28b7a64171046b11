"""``distbert model make``: write a deterministic random-weight BERT QA model (see :mod:`distbert.backends.modelmaker`).

``--out DIR`` writes the model there; without it the model goes to the cache
(``<DISTBERT_CACHE>/models/random/<shape>-<format>-<seed>/``, reused if already complete). The
path to pass as ``distbert run --model`` is printed on stdout.
"""

from __future__ import annotations

import argparse
from typing import Any

from distbert.backends import modelmaker


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``model make`` to ``subparsers``; its handler is ``args.handler(args) -> int``."""
    p = subparsers.add_parser("model", help="generate models (random weights, MLPerf I/O)")
    sub = p.add_subparsers(dest="model_command", required=True)
    make = sub.add_parser(
        "make", help="write a random-weight BERT QA model (onnx, onnx-int8 or torch)",
        description="Write a deterministic random-weight BERT question-answering model with the exact "
                    "MLPerf inputs/outputs. Its accuracy is meaningless; its speed is representative.")
    make.add_argument("--shape", choices=tuple(modelmaker.SHAPES), default="large",
                      help="large: BERT-Large (24x1024, MLPerf); base: 12x768; tiny: 2x64 (tests). Default large")
    make.add_argument("--format", dest="fmt", choices=modelmaker.FORMATS, default="onnx",
                      help="onnx: fp32 MLPerf names; onnx-int8: dynamically quantized, int8 MLPerf names; "
                           "torch: model.pytorch + bert_config.json. Default onnx")
    make.add_argument("--seed", type=int, default=0, help="weights are a function of (shape, seed); default 0")
    make.add_argument("--out", metavar="DIR", help="model directory (default: the cache)")
    make.set_defaults(handler=run)
    return p


def run(args: argparse.Namespace) -> int:
    if args.out:
        path = modelmaker.make_model(args.shape, args.fmt, args.seed, args.out)
    else:
        path = modelmaker.ensure_random_model(args.shape, args.fmt, args.seed)
    print(path)
    return 0
