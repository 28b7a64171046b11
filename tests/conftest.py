"""Shared fixtures: the data set the tests run on, and the official files for the tests that need them.

Two kinds of data fixture:

- ``squad_dev`` / ``vocab`` (and ``data_set``): *the data set the engine tests use*. The official
  SQuAD v1.1 dev set and BERT vocab when both lie under ``DISTBERT_DATA_DIR``
  (``squad/dev-v1.1.json``, ``bert/vocab.txt``), else a synthetic pair generated once per session by
  :mod:`tests.synthetic`. They never skip: every test that only needs *a* SQuAD-shaped data set runs
  anywhere and derives its counts from the data (``len(store)``), never from the dev set's 10833.
- ``official_squad_dev`` / ``official_vocab``: the official files, for the tests that assert facts of
  the official dev set (10833 features, its length statistics, its first feature ...). They skip
  when the files are absent.

``DISTBERT_REQUIRE_OFFICIAL_DATA=1`` (set by ``launch/test.sh`` when it finds the team's data dir)
turns a missing official file into a failure instead of a skip or a synthetic fallback, and fails the
session if any test skipped for want of data. The pytest header says which data set is in use.

Both data modes must pass (``launch/test.sh`` runs the data tests, marked ``data`` here, in each). So
the data reach a test only through these fixtures' explicit paths: ``DISTBERT_DATA_DIR`` is read once
and taken out of the environment, and downloads go to a closed port. A ``distbert run`` started
without ``--dataset`` then fails at once in either mode, instead of passing on the official files and
trying to download where they are absent.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import NoReturn

import pytest

from distbert import envs

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(os.environ.get("VIRTUAL_ENV", REPO / ".venv")) / "bin"

OFFICIAL_FILES = {"squad_dev": "squad/dev-v1.1.json", "vocab": "bert/vocab.txt"}
REQUIRE_ENV = "DISTBERT_REQUIRE_OFFICIAL_DATA"
# Every skip for want of data carries this text; a session that requires the official data fails on it.
NO_DATA = "official data absent"

#: the data dir this session was started with; no test or process a test starts sees the variable
DATA_DIR = envs.data_dir()
os.environ.pop("DISTBERT_DATA_DIR", None)
#: where every download of the session goes: a closed port (tests that download start their own server)
NO_DOWNLOADS = "http://127.0.0.1:9/tests-never-download"
os.environ["DISTBERT_MIRROR"] = NO_DOWNLOADS


#: ``DISTBERT_REQUIRE_LAUNCHERS=1`` (set by launch/test.sh as root, after launch/system-deps.sh): the Slurm and
#: network-namespace tests fail instead of skipping when their daemons or root are missing.
LAUNCHERS_ENV = "DISTBERT_REQUIRE_LAUNCHERS"


def launchers_unavailable(why: str | None) -> None:
    """Call at the top of a launcher test (or in its fixture): skip when ``why`` is set, or fail
    when DISTBERT_REQUIRE_LAUNCHERS=1."""
    if why is None:
        return
    if os.environ.get(LAUNCHERS_ENV, "") not in ("", "0"):
        pytest.fail(f"{why}, and {LAUNCHERS_ENV}=1", pytrace=False)
    pytest.skip(why)


def require_official() -> bool:
    return os.environ.get(REQUIRE_ENV, "") not in ("", "0")


def official_file(key: str) -> Path | None:
    """The official file ``key`` (``squad_dev`` or ``vocab``) under DISTBERT_DATA_DIR, None if absent."""
    root = DATA_DIR
    if root is None:
        return None
    path = root / OFFICIAL_FILES[key]
    return path if path.is_file() else None


def _missing_reason(key: str) -> str:
    root = DATA_DIR
    where = (f"{root / OFFICIAL_FILES[key]} is absent" if root is not None
             else "DISTBERT_DATA_DIR is unset")
    return f"{NO_DATA}: {where} (set DISTBERT_DATA_DIR to a folder holding {OFFICIAL_FILES[key]})"


def skip_for_data(reason: str) -> NoReturn:
    """Skip for want of data; a failure when DISTBERT_REQUIRE_OFFICIAL_DATA=1."""
    if NO_DATA not in reason:
        reason = f"{NO_DATA}: {reason}"
    if require_official():
        pytest.fail(f"{reason}, and {REQUIRE_ENV}=1", pytrace=False)
    pytest.skip(reason)


@dataclasses.dataclass(frozen=True)
class DataSet:
    dataset: Path
    vocab: Path
    official: bool


def _official_pair() -> DataSet | None:
    dev, voc = official_file("squad_dev"), official_file("vocab")
    return DataSet(dev, voc, True) if dev is not None and voc is not None else None


# ------------------------------------------------------------------------------ pytest hooks

def pytest_report_header(config) -> list[str]:
    root = DATA_DIR
    if _official_pair() is not None:
        line = f"distbert data: official dev set and vocab under {root}"
    else:
        why = "DISTBERT_DATA_DIR is unset" if root is None else f"DISTBERT_DATA_DIR={root} lacks them"
        if require_official():
            line = f"distbert data: official files required but absent ({why}): data tests FAIL"
        else:
            line = (f"distbert data: synthetic SQuAD set (tests/synthetic.py; the official files: {why}); "
                    "official-only tests skip")
    return [line + (f"; {REQUIRE_ENV}=1" if require_official() else "")]


def pytest_collection_modifyitems(config, items) -> None:
    """Mark ``data`` every test that reads the data set in use (``data_set`` in its fixture closure):
    launch/test.sh runs these a second time, on the synthetic set, after a run on the official files."""
    for item in items:
        if "data_set" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.data)


_DATA_SKIPS: list[str] = []


def pytest_runtest_logreport(report) -> None:
    if report.skipped and NO_DATA in str(report.longrepr):
        _DATA_SKIPS.append(report.nodeid)


def pytest_sessionfinish(session, exitstatus) -> None:
    if require_official() and _DATA_SKIPS:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    if require_official() and _DATA_SKIPS:
        terminalreporter.section("official data required", sep="=", red=True)
        terminalreporter.write_line(f"{len(_DATA_SKIPS)} test(s) skipped for want of data while "
                                    f"{REQUIRE_ENV}=1; the session fails:")
        for nodeid in _DATA_SKIPS:
            terminalreporter.write_line(f"  {nodeid}")


# ------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory) -> DataSet:
    """The synthetic data set, written once per session (a tmp dir; never the repository)."""
    from tests.synthetic import write_synthetic_squad

    dataset, vocab = write_synthetic_squad(tmp_path_factory.mktemp("synthetic-data"))
    return DataSet(dataset, vocab, False)


@pytest.fixture(scope="session")
def data_set(request) -> DataSet:
    """The official pair when both files are there, else the synthetic one (a failure instead when
    DISTBERT_REQUIRE_OFFICIAL_DATA=1)."""
    pair = _official_pair()
    if pair is not None:
        return pair
    if require_official():
        missing = [k for k in OFFICIAL_FILES if official_file(k) is None]
        pytest.fail(f"{_missing_reason(missing[0])}, and {REQUIRE_ENV}=1", pytrace=False)
    return request.getfixturevalue("synthetic_data")


@pytest.fixture(scope="session")
def squad_dev(data_set) -> Path:
    """SQuAD v1.1 dev json of the data set in use (official or synthetic): never skips."""
    return data_set.dataset


@pytest.fixture(scope="session")
def vocab(data_set) -> Path:
    """Uncased BERT vocab matching ``squad_dev``: never skips."""
    return data_set.vocab


def official_or_skip(key: str) -> Path:
    """The official file ``key``; skips (fails under DISTBERT_REQUIRE_OFFICIAL_DATA=1) when absent."""
    path = official_file(key)
    if path is None:
        skip_for_data(_missing_reason(key))
    return path


@pytest.fixture(scope="session")
def official_squad_dev() -> Path:
    """The official dev-v1.1.json."""
    return official_or_skip("squad_dev")


@pytest.fixture(scope="session")
def official_vocab() -> Path:
    """The official BERT uncased vocab.txt."""
    return official_or_skip("vocab")


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory) -> Path:
    """One feature cache for the whole test session (building the full dev set costs seconds)."""
    path = tmp_path_factory.mktemp("distbert-cache")
    return path
