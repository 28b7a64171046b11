"""``distbert worker --connect``: a worker that joins a running coordinator."""

from __future__ import annotations

import argparse
import os

from distbert import envs
from distbert.cli.logs import setup_logging
from distbert.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("worker", help="join a running coordinator (key from DISTBERT_SESSION_KEY or --key-file)")
    p.add_argument("--connect", required=True, help="coordinator endpoint, e.g. tcp://HOST:PORT")
    p.add_argument("--rank", type=int, required=True, help="this worker's id (unique, >= 1)")
    p.add_argument("--key-file", help="file holding the session key (never put the key on a command line)")
    p.add_argument("--local-index", type=int, default=0, help="index among workers on this host (device choice)")
    p.add_argument("--local-count", type=int, default=1, help="workers on this host")
    p.add_argument("--parent-pid", type=int, help="exit when this process is no longer our parent")
    p.set_defaults(handler=cmd_worker)


def cmd_worker(args: argparse.Namespace) -> int:
    from distbert.engine.worker import worker_run
    from distbert.wire.base import Endpoint
    from distbert.wire.keys import check_session_key
    from distbert.wire.zmq import ZmqWorkerTransport

    setup_logging(args.rank)
    if args.rank < 1:
        raise UserError("--rank must be >= 1 (rank 0 is the coordinator)")
    key, source = envs.session_key(), "DISTBERT_SESSION_KEY"
    if args.key_file:
        try:
            key, source = open(args.key_file).read(), f"--key-file {args.key_file}"
        except OSError as exc:
            raise UserError(f"--key-file {args.key_file}: {exc.strerror}") from exc
    if not key:
        raise UserError("no session key: set DISTBERT_SESSION_KEY or pass --key-file (rank 0's key)")
    key = check_session_key(key, source)
    transport = ZmqWorkerTransport.connect(Endpoint(args.connect, key), args.rank)
    parent = args.parent_pid if args.parent_pid and args.parent_pid == os.getppid() else None
    return worker_run(transport, args.rank, args.local_index, args.local_count, parent)
