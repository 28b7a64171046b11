"""Facts about this host for ``run.json`` and a submission's ``systems/<system>.json``, and about the
distbert source that runs (:func:`source_facts`: the package's files and their digest, the git commit
when it runs from a checkout), which the submission's code folder must hold.

Read from ``/proc`` and the standard library only (``nvidia-smi`` and ``git`` when they are on PATH),
so it costs nothing and works on any Linux node. Every value that cannot be found is ``None``: the
submission builder turns those into fields the user must fill in, never into guesses.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
from pathlib import Path
from typing import Any


def _cpuinfo() -> list[dict[str, str]]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    blocks = []
    for block in text.strip().split("\n\n"):
        entry = {}
        for line in block.splitlines():
            key, _, value = line.partition(":")
            entry[key.strip()] = value.strip()
        blocks.append(entry)
    return blocks


def _mem_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _os_name() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return f"{line.split('=', 1)[1].strip(chr(34))} (Linux {platform.release()})"
    except OSError:
        pass
    return f"{platform.system()} {platform.release()}"


def _gpus() -> list[dict[str, str]]:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return []
    try:
        out = subprocess.run([exe, "--query-gpu=name,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = []
    for line in out.strip().splitlines():
        name, _, memory = line.partition(",")
        gpus.append({"name": name.strip(), "memory": memory.strip()})
    return gpus


def host_facts() -> dict[str, Any]:
    """CPU model, sockets, cores, memory, disk, OS and GPUs of this host."""
    cpus = _cpuinfo()
    model = next((c.get("model name") for c in cpus if c.get("model name")), None) or platform.processor() or None
    sockets = len({c.get("physical id") for c in cpus if "physical id" in c}) or None
    cores = len({(c.get("physical id"), c.get("core id")) for c in cpus if "core id" in c}) or os.cpu_count()
    mem = _mem_bytes()
    disk = shutil.disk_usage("/").total if Path("/").exists() else None
    return {
        "hostname": platform.node(),
        "cpu_model": model,
        "sockets": sockets,
        "cores": cores,
        "logical_cpus": os.cpu_count(),
        "memory_gb": round(mem / 2**30) if mem else None,
        "disk_gb": round(disk / 1e9) if disk else None,
        "os": _os_name(),
        "python": platform.python_version(),
        "gpus": _gpus(),
    }


# --- the distbert source that runs ------------------------------------------------------------------

#: git answers within this, or the commit is unknown (never a hang at a run's start)
GIT_TIMEOUT_S = 5.0


def package_dir() -> Path:
    """The folder of the ``distbert`` package this process imported (a checkout's or site-packages')."""
    import distbert

    return Path(distbert.__file__).resolve().parent


def _is_source(rel: Path) -> bool:
    """Whether a file under the package folder is source that can have run: not compiled bytecode, and
    no part of its path hidden (an editor's ``.build.py.swp``, ``.DS_Store``) or holding whitespace
    (``copy of build.py``); none of those can be imported, and the official v4.1 checker rejects a
    whole submitter folder for a ``__pycache__`` folder, a dot-name or a name with a space in it."""
    parts = rel.parts
    return ("__pycache__" not in parts and rel.suffix not in (".pyc", ".pyo")
            and not any(part.startswith(".") or any(c.isspace() for c in part) for part in parts))


def source_files(root: Path | None = None) -> list[Path]:
    """The package's source files, relative to ``root`` (the package folder), sorted: every file but
    compiled bytecode, hidden files and names with whitespace (:func:`_is_source`)."""
    root = root or package_dir()
    return sorted(rel for p in root.rglob("*") if p.is_file() and _is_source(rel := p.relative_to(root)))


def _git(top: Path, *args: str) -> str | None:
    git = shutil.which("git")
    if git is None:
        return None
    try:
        done = subprocess.run([git, "-C", str(top), *args], capture_output=True, text=True, timeout=GIT_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def source_facts(root: Path | None = None) -> dict[str, Any]:
    """``{"digest", "files", "path", "commit", "dirty"}``: the sha256 over the package's files (names
    and contents), their count and folder; from a git checkout, its commit and whether the package's
    files differ from it (``commit``/``dirty`` are None elsewhere)."""
    root = root or package_dir()
    digest, count = source_digest(root)
    commit = _git(root, "rev-parse", "HEAD")
    status = _git(root, "status", "--porcelain", "--", ".") if commit else None
    return {"digest": digest, "files": count, "path": str(root), "commit": commit,
            "dirty": None if status is None else bool(status)}


def source_digest(root: Path) -> tuple[str, int]:
    """(sha256 over the names and contents of :func:`source_files`, their count)."""
    h = hashlib.sha256()
    files = source_files(root)
    for rel in files:
        h.update(rel.as_posix().encode() + b"\0" + (root / rel).read_bytes() + b"\0")
    return h.hexdigest(), len(files)
