"""Every ``DISTBERT_*`` environment variable, read in one place.

Command line beats environment beats default: callers pass the CLI value first and fall back to
these accessors. Launcher variables (``OMPI_*``, ``PMI_*``, ``SLURM_*`` ...) are *not* read here;
they belong to :mod:`distbert.topology`.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``DISTBERT_CACHE``: feature cache, downloads, generated models (default ``~/.cache/distbert``)."""
    value = os.environ.get("DISTBERT_CACHE")
    return Path(value).expanduser() if value else Path.home() / ".cache" / "distbert"


def data_dir() -> Path | None:
    """``DISTBERT_DATA_DIR``: a team's local copy of the data (``squad/dev-v1.1.json``,
    ``bert/vocab.txt``, ``models/<format>/``). None when unset or empty: there is no default (the
    files are then looked up in the cache, or passed with ``--dataset``/``--vocab``/``--model``)."""
    value = os.environ.get("DISTBERT_DATA_DIR")
    return Path(value).expanduser() if value else None


def session_key() -> str | None:
    """``DISTBERT_SESSION_KEY``: shared secret a ``distbert worker --connect`` presents to rank 0."""
    return os.environ.get("DISTBERT_SESSION_KEY") or None


def log_level() -> str:
    """``DISTBERT_LOG_LEVEL``: Python logging level name (default ``INFO``)."""
    return os.environ.get("DISTBERT_LOG_LEVEL", "INFO").upper()


def no_progress() -> bool:
    """``DISTBERT_NO_PROGRESS=1`` hides progress bars (they are also hidden when stderr is not a TTY)."""
    return os.environ.get("DISTBERT_NO_PROGRESS", "") not in ("", "0")


def mirror_url() -> str | None:
    """``DISTBERT_MIRROR``: base URL serving every artifact by file name (``<mirror>/<file name>``).

    When set it replaces the official URLs (air-gapped clusters with an internal mirror, tests);
    ``file:///path`` works too. Unset or empty: the official URLs.
    """
    return os.environ.get("DISTBERT_MIRROR") or None


def worker_inline() -> bool:
    """``DISTBERT_WORKER_INLINE=0`` hands every batch to the worker's compute thread, one-sample batches
    included (default: those run on the I/O thread when the compute thread is idle). For measuring
    what inline execution saves (``bench/latency_timeline.py``)."""
    return os.environ.get("DISTBERT_WORKER_INLINE", "1") not in ("0", "")


def worker_pipeline() -> bool:
    """``DISTBERT_WORKER_PIPELINE=0`` keeps a worker on one compute thread even when its backend gains
    from overlapping the next batch's gather and device copy with this batch's compute (the torch
    backend on CUDA; default: a prepare thread does that). For A/B measurement."""
    return os.environ.get("DISTBERT_WORKER_PIPELINE", "1") not in ("0", "")


def trace_dir() -> str | None:
    """``DISTBERT_TRACE``: a folder; every process of the run writes its per-hop timestamps there at
    exit (``distbert.util.trace``, read by ``bench/latency_timeline.py``). Unset: no tracing."""
    return os.environ.get("DISTBERT_TRACE") or None


def announce_file() -> Path | None:
    """``DISTBERT_ANNOUNCE``: a file where rank 0 of a run without a launcher writes where it listens
    (``{"address", "rank0_host"}``) once its socket is bound. ``distbert submission run`` under a
    launcher sets it for each child run, to tell the launched ranks where to connect."""
    value = os.environ.get("DISTBERT_ANNOUNCE")
    return Path(value) if value else None


def parent_pid() -> int | None:
    """``DISTBERT_PARENT_PID``: the process that started this run (``distbert submission run`` sets it
    for each child run). Rank 0's watchdog ends the run when that process is gone (``Coordinator``)."""
    value = os.environ.get("DISTBERT_PARENT_PID", "")
    return int(value) if value.isdigit() else None


def gc_tune() -> bool:
    """``DISTBERT_GC_TUNE=0`` keeps Python's default garbage-collector settings while LoadGen runs
    (default: fewer collections during a test; ``run/loadgen.quiet_gc``). For A/B measurements."""
    return os.environ.get("DISTBERT_GC_TUNE", "1") not in ("0", "")


def loadgen_native() -> bool:
    """``DISTBERT_LOADGEN_NATIVE=0`` completes samples through LoadGen's Python binding (a list of
    ``QuerySampleResponse`` objects) instead of its C entry point (``engine/lgnative.py``). For A/B
    measurements, or a LoadGen build where the C path misbehaves."""
    return os.environ.get("DISTBERT_LOADGEN_NATIVE", "1") not in ("0", "")


def local_slot_given() -> bool:
    """Whether ``DISTBERT_LOCAL_SLOT`` is set at all (then only worker processes honour the slot)."""
    return "DISTBERT_LOCAL_SLOT" in os.environ


def local_slot() -> tuple[int, int, int | None]:
    """``DISTBERT_LOCAL_SLOT=FIRST_RANK,FIRST_LOCAL_INDEX,LOCAL_COUNT``: where the local workers of a
    run without a launcher sit (default ``1,0,`` = ranks from 1, device slots from 0 of their own
    count). ``distbert submission run`` under a launcher sets it when rank 0's node also computes
    (``--coordinator-hosts-worker``): rank 0's worker then takes the rank after the launched ones and
    rank 0's device slot on its node, as in a plain launched run."""
    parts = os.environ.get("DISTBERT_LOCAL_SLOT", "").split(",")
    if len(parts) != 3 or not parts[0].isdigit() or not parts[1].isdigit():
        return 1, 0, None
    return max(1, int(parts[0])), int(parts[1]), int(parts[2]) if parts[2].isdigit() else None
