"""Facts about this host for ``run.json`` and a submission's ``systems/<system>.json``.

Read from ``/proc`` and the standard library only (``nvidia-smi`` when it is on PATH), so it costs
nothing and works on any Linux node. Every value that cannot be found is ``None``: the submission
builder turns those into fields the user must fill in, never into guesses.
"""

from __future__ import annotations

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
