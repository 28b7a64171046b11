"""Single-node fallback: rank 0 spawns K local worker processes and owns their lives.

Workers are started as ``python -m distbert worker --connect ADDR --rank I ...`` (so ``ps`` shows
``distbert worker``); the session key travels in the environment, never on the command line.
Stopping is staged (STYLE §9): the coordinator asks them to exit, then ``stop()`` waits, then
terminates, then kills. Workers also exit on their own when their parent disappears.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time

log = logging.getLogger(__name__)


class LocalWorkers:
    def __init__(self, count: int, address: str, key: str, first_rank: int = 1,
                 extra_env: dict[str, str] | None = None, first_local_index: int = 0,
                 local_count: int | None = None) -> None:
        self.count = count
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        env = dict(os.environ)
        env["DISTBERT_SESSION_KEY"] = key
        env.update(extra_env or {})
        for i in range(count):
            rank = first_rank + i
            cmd = [sys.executable, "-m", "distbert", "worker", "--connect", address, "--rank", str(rank),
                   "--local-index", str(first_local_index + i), "--local-count", str(local_count or count),
                   "--parent-pid", str(os.getpid())]
            self.procs[rank] = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL)
        log.info("spawned %d local workers: pids %s", count, [p.pid for p in self.procs.values()])

    @property
    def ranks(self) -> set[int]:
        return set(self.procs)

    def is_alive(self, rank: int) -> bool:
        """False only for a local worker whose process has exited (other ranks: not ours to tell)."""
        proc = self.procs.get(rank)
        return proc is None or proc.poll() is None

    def stop(self, grace_s: float = 10.0) -> dict[int, int]:
        """Wait, then SIGTERM, then SIGKILL. Returns exit codes. Safe to call twice."""
        deadline = time.monotonic() + grace_s
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for sig_name, wait_s in (("terminate", 3.0), ("kill", 3.0)):
            alive = [p for p in self.procs.values() if p.poll() is None]
            if not alive:
                break
            log.warning("%s %d local workers still running", sig_name, len(alive))
            for proc in alive:
                getattr(proc, sig_name)()
            for proc in alive:
                try:
                    proc.wait(timeout=wait_s)
                except subprocess.TimeoutExpired:
                    pass
        return {rank: proc.returncode for rank, proc in self.procs.items()}
