"""Reading LoadGen's logs: ``mlperf_log_detail.txt`` entries and the headline figures of a test.

Below both the run driver (which reads a test it just ran) and the submission checker (which reads
the logs of a tree), so neither depends on the other.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

_MLLOG = re.compile(r":::MLLOG (\{.*\})\s*$")


def read_detail(path: Path) -> dict[str, Any]:
    """``mlperf_log_detail.txt`` -> {key: value} (last value wins); errors (``error_*`` keys or
    ``is_error`` entries) collected under ``"_errors"`` as ``"key: value"`` strings."""
    out: dict[str, Any] = {"_errors": []}
    if not path.is_file():
        return out
    for line in path.read_text(errors="replace").splitlines():
        match = _MLLOG.search(line)
        if not match:
            continue
        try:
            entry = json.loads(match.group(1))
        except json.JSONDecodeError:
            continue
        key = entry.get("key")
        # LoadGen logs errors as "error_<kind>" keys (e.g. error_invalid_config) flagged is_error
        if (key or "").startswith("error") or (entry.get("metadata") or {}).get("is_error"):
            out["_errors"].append(f"{key}: {entry.get('value')}")
        elif key:
            out[key] = entry.get("value")
    return out


def headline(detail: dict[str, Any], scenario: str) -> dict[str, Any]:
    """The figures a person wants after a run."""
    keys = {
        "Offline": ["result_samples_per_second"],
        "Server": ["result_completed_samples_per_sec", "result_scheduled_samples_per_sec",
                   "result_99.00_percentile_latency_ns"],
        "SingleStream": ["result_90.00_percentile_latency_ns", "early_stopping_latency_ss",
                         "result_samples_per_second"],
    }[scenario]
    out = {k: detail.get(k) for k in keys + ["result_validity", "result_mean_latency_ns",
                                            "result_99.00_percentile_latency_ns",
                                            "result_perf_constraints_met", "result_min_duration_met",
                                            "result_min_queries_met", "early_stopping_met"] if k in detail}
    out["loadgen_errors"] = len(detail.get("_errors", []))
    return out


#: what LoadGen requires of a VALID performance run: the detail-log key, and what its ``false`` means
REQUIREMENTS = (("result_min_duration_met", "min duration not met"),
                ("result_min_queries_met", "min query count not met"),
                ("early_stopping_met", "early stopping not met"),
                ("result_perf_constraints_met", "latency bound not met"))


def unmet_requirements(detail: dict[str, Any]) -> list[tuple[str, str]]:
    """The (key, reason) pairs of :data:`REQUIREMENTS` that a detail log says are not met."""
    return [(key, text) for key, text in REQUIREMENTS if detail.get(key) is False]
