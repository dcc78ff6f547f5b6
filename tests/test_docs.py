"""The docs cannot drift from the product: the command-line page is what the flags' declaration gives."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_cli_page_is_generated_from_the_declaration():
    sys.path.insert(0, str(REPO / "tools"))
    import cli_reference

    page = (REPO / "docs" / "cli.md").read_text()
    assert page == cli_reference.render(), "docs/cli.md is out of date: run python tools/cli_reference.py"
    for flag in ("--track", "--budget", "--curriculum", "--resume", "--no-curriculum"):
        assert f"| `{flag}` |" in page


def test_the_check_mode_fails_on_a_stale_page(tmp_path, monkeypatch):
    sys.path.insert(0, str(REPO / "tools"))
    import cli_reference

    stale = tmp_path / "cli.md"
    stale.write_text(cli_reference.render().replace("wall-clock budget", "budget"))
    monkeypatch.setattr(cli_reference, "PAGE", stale)
    assert cli_reference.main(["--check"]) == 1
    monkeypatch.setattr(cli_reference, "PAGE", REPO / "docs" / "cli.md")
    assert cli_reference.main(["--check"]) == 0


def test_the_readme_commands_that_print_help_run():
    for args in (["-m", "trainer", "--help"], ["-m", "trainer", "--list-presets"]):
        done = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and done.stdout.strip(), done.stderr
