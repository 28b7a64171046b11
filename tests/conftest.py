"""Shared fixtures: the official data files, found via ``DISTBERT_DATA_DIR``.

Tests that need the SQuAD dev set or the vocab skip with a clear reason when they are absent;
everything else must run anywhere.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from distbert import envs

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(os.environ.get("VIRTUAL_ENV", REPO / ".venv")) / "bin"


def _data_file(rel: str) -> Path:
    path = envs.data_dir() / rel
    if not path.is_file():
        pytest.skip(f"{path} is absent: set DISTBERT_DATA_DIR to a folder holding {rel}")
    return path


@pytest.fixture(scope="session")
def squad_dev() -> Path:
    return _data_file("squad/dev-v1.1.json")


@pytest.fixture(scope="session")
def vocab() -> Path:
    return _data_file("bert/vocab.txt")


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory) -> Path:
    """One feature cache for the whole test session (building the full dev set costs seconds)."""
    path = tmp_path_factory.mktemp("distbert-cache")
    return path
