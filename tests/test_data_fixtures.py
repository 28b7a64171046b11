"""tests/conftest.py's data policy, in child pytest sessions: the engine's data set never skips
(official files, else the synthetic set), official-only tests skip without the official files, and
DISTBERT_REQUIRE_OFFICIAL_DATA=1 turns every such skip into a failing session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import NO_DATA, REPO, REQUIRE_ENV

PROBE = '''
import pytest

def test_any(squad_dev, vocab, data_set):
    assert squad_dev.is_file() and vocab.is_file() and squad_dev == data_set.dataset
    print("DATASET", "official" if data_set.official else "synthetic", squad_dev)

def test_official(official_squad_dev, official_vocab):
    assert official_squad_dev.is_file() and official_vocab.is_file()
'''

OWN_SKIP = f'''
import pytest

def test_skips_itself():
    pytest.skip("{NO_DATA}: a file this test wanted")

def test_other_skip():
    pytest.skip("not for want of data")
'''


def _session(tmp_path: Path, source: str, data_dir: Path | None, require: bool) -> subprocess.CompletedProcess[str]:
    test = tmp_path / "test_probe.py"
    test.write_text(source)
    env = {k: v for k, v in os.environ.items() if k not in ("DISTBERT_DATA_DIR", REQUIRE_ENV, "PYTEST_ADDOPTS")}
    env["PYTHONPATH"] = str(REPO)
    if data_dir is not None:
        env["DISTBERT_DATA_DIR"] = str(data_dir)
    if require:
        env[REQUIRE_ENV] = "1"
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "tests.conftest", "-p", "no:cacheprovider",
                           "-s", "-rs", "--rootdir", str(tmp_path), str(test)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture
def official_dir(tmp_path: Path) -> Path:
    """A data dir holding 'official' files (the synthetic pair under the official names)."""
    from tests.synthetic import write_synthetic_squad

    write_synthetic_squad(tmp_path / "data")
    return tmp_path / "data"


@pytest.mark.parametrize("data_dir", ["unset", "empty"])
def test_without_official_data_the_synthetic_set_is_used_and_official_tests_skip(tmp_path, data_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    done = _session(tmp_path, PROBE, None if data_dir == "unset" else empty, require=False)
    assert done.returncode == 0, done.stdout[-3000:]
    assert "distbert data: synthetic SQuAD set" in done.stdout
    assert "DATASET synthetic" in done.stdout and "1 passed, 1 skipped" in done.stdout
    assert NO_DATA in done.stdout


def test_required_official_data_absent_fails(tmp_path):
    (tmp_path / "empty").mkdir()
    done = _session(tmp_path, PROBE, tmp_path / "empty", require=True)
    assert done.returncode == 1, done.stdout[-3000:]
    assert "skipped" not in done.stdout.splitlines()[-1]
    assert f"{REQUIRE_ENV}=1" in done.stdout and "DATASET" not in done.stdout   # no synthetic fallback


def test_official_data_present_is_used(tmp_path, official_dir):
    done = _session(tmp_path, PROBE, official_dir, require=True)
    assert done.returncode == 0, done.stdout[-3000:]
    assert f"distbert data: official dev set and vocab under {official_dir}" in done.stdout
    assert f"DATASET official {official_dir / 'squad' / 'dev-v1.1.json'}" in done.stdout
    assert "2 passed" in done.stdout


@pytest.mark.parametrize("require", [False, True])
def test_a_data_skip_fails_the_session_only_when_official_data_is_required(tmp_path, official_dir, require):
    done = _session(tmp_path, OWN_SKIP, official_dir, require=require)
    assert "2 skipped" in done.stdout
    if require:
        assert done.returncode == 1, done.stdout[-3000:]
        assert "1 test(s) skipped for want of data" in done.stdout and "test_skips_itself" in done.stdout
        assert "test_other_skip" not in done.stdout.split("official data required")[1]
    else:
        assert done.returncode == 0, done.stdout[-3000:]
