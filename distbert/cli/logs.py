"""Log lines on stderr with the rank in each (STYLE §12)."""

from __future__ import annotations

import logging
import sys

from distbert import envs


def setup_logging(rank: int | str) -> None:
    logging.basicConfig(level=getattr(logging, envs.log_level(), logging.INFO), stream=sys.stderr,
                        format=f"%(asctime)s %(levelname).1s [rank {rank}] %(name)s: %(message)s",
                        datefmt="%H:%M:%S", force=True)
