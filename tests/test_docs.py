"""The docs cannot drift from the product: the command-line page is what the flags' declaration gives."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The README's "Train on your data" programs: the function each console script runs (setup.cfg), and the module
# that `python -m` runs as the same program (the tests run it so, installed scripts or not)
PROGRAMS = {"vit-prepare": ("pipelines.prepare:main", "pipelines.prepare"), "vit-train": ("trainer.cli:run", "trainer"),
            "vit-report": ("trainer.report:main", "trainer.report")}


def _tool(name: str):
    """A script of tools/ as a module, loaded from its path (tools/ is not an installed package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"tools_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_cli_page_is_generated_from_the_declaration():
    cli_reference = _tool("cli_reference")
    page = (REPO / "docs" / "cli.md").read_text()
    assert page == cli_reference.render(), "docs/cli.md is out of date: run python tools/cli_reference.py"
    for flag in ("--track", "--budget", "--curriculum", "--resume", "--no-curriculum"):
        assert f"| `{flag}` |" in page


def test_the_check_mode_fails_on_a_stale_page(tmp_path, monkeypatch):
    cli_reference = _tool("cli_reference")
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


def _commands() -> list[tuple[str, str]]:
    """Every command line of the README's and the docs' ```bash blocks: continuations joined, comments cut."""
    import re

    found = []
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for block in re.findall(r"```bash\n(.*?)```", path.read_text(), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = re.split(r"\s+#\s", " " + line.strip(), maxsplit=1)[0].strip()
                if line and not line.startswith("#"):
                    found.append((path.name, line))
    return found


def _argv(line: str, program: str) -> list[str] | None:
    """The arguments of ``program`` in ``line`` (the part of a ``&&`` chain that runs it), shell variables expanded;
    None where a shell construct the test cannot expand remains."""
    import os
    import shlex

    for part in line.split("&&"):
        words = shlex.split(os.path.expandvars(part.strip()))
        if words[:len(program.split())] == program.split():
            rest = words[len(program.split()):]
            return None if any("$" in w or "`" in w for w in rest) else rest
    return None


def test_every_documented_command_uses_flags_that_exist():
    """The docs' command lines, parsed by the programs' own parsers: a renamed or removed flag fails here."""
    from pipelines import prepare
    from trainer import report
    from trainer.commands import eval_parser, export_parser, predict_parser
    from trainer.config import build_parser

    programs = {"vit-train": build_parser().parse_args, "python -m trainer": build_parser().parse_args,
                "vit-eval": eval_parser().parse_args, "vit-predict": predict_parser().parse_args,
                "vit-export": export_parser().parse_args,
                "vit-prepare": prepare.parse_args, "python tools/prepare_imagenet.py": prepare.parse_args,
                "vit-report": report.parse_args, "python tools/report.py": report.parse_args}
    checked = 0
    for page, line in _commands():
        for program, parse in programs.items():
            argv = _argv(line, program)
            if argv is None or argv == ["--help"]:
                continue
            try:
                parse(argv)
            except SystemExit:
                raise AssertionError(f"{page}: {line}") from None
            checked += 1
    assert checked >= 15, checked  # the docs hold 16: a test that checks nothing would pass quietly


def test_the_readmes_train_on_your_data_commands_run(tmp_path, colour_dataset):
    """The README's three commands (prepare, train, report) as a new user runs them, on a tiny folder: the paths
    and the budget scaled down, the flags and programs as written."""
    import os
    import re

    readme = (REPO / "README.md").read_text()
    block = re.search(r"## Train on your data.*?```bash\n(.*?)```", readme, re.S).group(1)
    lines = [re.split(r"\s+#\s", line)[0].strip() for line in block.splitlines() if line.strip()]
    assert [line.split()[0] for line in lines] == ["vit-prepare", "vit-train", "vit-report"]
    tiny = {"~/downloads": str(colour_dataset), "/data/imagenet": str(tmp_path / "prepared"),
            "runs/in1k": str(tmp_path / "runs" / "in1k"),
            "--budget 24h": "--budget 8s --model vit_local_test_patch16 --image-size 32 --batch-size 8"}
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for line in lines:
        for a, b in tiny.items():
            line = line.replace(a, b)
        argv = line.split()
        argv = [sys.executable, "-m", PROGRAMS[argv[0]][1], *argv[1:]]
        done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, (line, done.stderr[-2000:])
    assert (tmp_path / "prepared" / "manifest.json").is_file()
    assert (tmp_path / "runs" / "in1k" / "summary.json").is_file()
    assert "| in1k |" in done.stdout  # the report's table names the run


def test_the_scripts_in_tools_still_run_the_programs():
    """`python tools/prepare_imagenet.py` and `python tools/report.py`, as older docs and scripts write them."""
    for script, prog in (("prepare_imagenet.py", "vit-prepare"), ("report.py", "vit-report")):
        done = subprocess.run([sys.executable, str(REPO / "tools" / script), "--help"], capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0 and done.stdout.startswith(f"usage: {prog}"), done.stderr


def test_the_console_scripts_name_functions_that_exist():
    """setup.cfg's console_scripts (what the docs' vit-* commands are): each names a function of the packages."""
    import configparser
    import importlib

    scripts = configparser.ConfigParser()
    scripts.read(REPO / "setup.cfg")
    declared = dict(line.replace(" ", "").split("=") for line in
                    scripts["options.entry_points"]["console_scripts"].strip().splitlines())
    assert {name: declared.get(name) for name in PROGRAMS} == {name: f for name, (f, _) in PROGRAMS.items()}
    for target in declared.values():
        module, _, function = target.partition(":")
        assert callable(getattr(importlib.import_module(module), function)), target
