"""docs/cli.md, the command-line reference, is generated from the argparse parsers
(``python -m distbert.cli.docs``): it must be current, and every flag that ``--help`` shows for a
command must appear in that command's section."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from distbert.cli import docs
from distbert.cli.main import build_parser
from tests.conftest import REPO

CLI_MD = REPO / "docs" / "cli.md"
FLAG = re.compile(r"(?<![\w-])--?[A-Za-z][\w-]*")


def _sections(text: str) -> dict[str, str]:
    """``{"distbert run": its section's text, ...}`` from docs/cli.md's ``## `...` `` headings."""
    parts = re.split(r"^## `([^`]+)`\n", text, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def _flags(help_text: str) -> set[str]:
    """The option strings a ``--help`` text lists (its usage line and its option rows)."""
    return set(FLAG.findall(help_text.split("\n\n", 1)[0])) | {
        f for line in help_text.splitlines() if re.match(r"\s{2}-", line) for f in FLAG.findall(line.split("  ")[1])}


def test_cli_md_is_current():
    assert CLI_MD.read_text() == docs.render(), "docs/cli.md is stale: run python -m distbert.cli.docs"


def test_check_mode_says_stale_in_one_line(tmp_path):
    stale = tmp_path / "cli.md"
    stale.write_text(docs.render().replace("`--scenario`", "`--scenari0`"))
    assert docs.main(["--check", "--out", str(stale)]) == 1
    assert docs.main(["--out", str(stale)]) == 0 and docs.main(["--check", "--out", str(stale)]) == 0


def test_every_flag_of_distbert_run_help_is_in_its_section():
    """The real ``distbert run --help``, from a subprocess, against the run section."""
    out = subprocess.run([sys.executable, "-m", "distbert", "run", "--help"], capture_output=True, text=True,
                         check=True, timeout=120, env={"COLUMNS": "400", "PYTHONPATH": str(REPO)}).stdout
    flags = _flags(out) - {"-h", "--help"}
    assert len(flags) > 40, sorted(flags)   # the parse found them
    section = _sections(CLI_MD.read_text())["distbert run"]
    missing = sorted(f for f in flags if f"`{f}`" not in section)
    assert not missing, f"flags of distbert run --help missing from docs/cli.md: {missing}"


@pytest.mark.parametrize("path", [" ".join(p) for p, _, _ in docs.commands(build_parser())])
def test_every_flag_of_every_command_is_in_its_section(path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")
    parser = next(p for names, p, _ in docs.commands(build_parser()) if " ".join(names) == path)
    section = _sections(CLI_MD.read_text()).get(path)
    assert section is not None, f"docs/cli.md has no section for {path}"
    missing = sorted(f for f in _flags(parser.format_help()) - {"-h", "--help"} if f"`{f}`" not in section)
    assert not missing, f"flags of {path} --help missing from docs/cli.md: {missing}"
