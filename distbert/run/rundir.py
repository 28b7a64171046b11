"""The run directory's life: chosen, written under a temporary name, then committed or marked failed.

A results tree on disk is either complete (``DIR``) or plainly marked (``DIR.failed/`` with
``error.txt``): :meth:`RunDir.commit` renames the temporary folder into place only after everything
in it was written, and :meth:`RunDir.fail` renames it aside with the cause.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import tempfile
from pathlib import Path

from distbert.config import RunConfig
from distbert.errors import UserError


def output_dir(cfg: RunConfig) -> Path:
    """``--output``, which must be new or empty; else ``results/<time>-<scenario>-<backend>``."""
    if cfg.output:
        out = Path(cfg.output)
        if out.exists() and any(out.iterdir()):
            raise UserError(f"--output {out} exists and is not empty: choose another directory or remove it")
        return out
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("results") / f"{stamp}-{cfg.loadgen.scenario}-{cfg.backend.name}"


class RunDir:
    """``work`` is where the run writes; ``final`` is where it appears when it succeeded."""

    def __init__(self, final: Path) -> None:
        self.final = final
        final.parent.mkdir(parents=True, exist_ok=True)
        self.work = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))

    @property
    def failed(self) -> Path:
        return self.final.with_name(self.final.name + ".failed")

    def commit(self) -> Path:
        os.replace(self.work, self.final)
        return self.final

    def fail(self, exc: BaseException) -> Path:
        """Write ``error.txt`` with the cause and rename the folder to ``DIR.failed`` (replacing an
        older one)."""
        if self.failed.exists():
            shutil.rmtree(self.failed, ignore_errors=True)
        (self.work / "error.txt").write_text(f"{type(exc).__name__}: {exc}\n")
        os.replace(self.work, self.failed)
        return self.failed
