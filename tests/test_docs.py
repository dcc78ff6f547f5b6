"""The docs cannot drift from the product: the command-line page is what the flags' declaration gives, every command
a page shows parses with its program's own parser, and the README's quick start runs as written."""

from __future__ import annotations

import argparse
import contextlib
import inspect
import io
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

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
    sys.modules[spec.name] = module  # dataclasses look their module up while it loads
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


# -- every command a page shows, checked by its program's own parser -------------------------------------------------

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
VIT = ("vit-train", "vit-eval", "vit-predict", "vit-export", "vit-prepare", "vit-report")
# shell words that end one command and start the next; and the words that may come before a program
SEPARATORS = {"&&", "||", ";", "|", "&", "(", ")", "<", ">", ">>", "<<"}
PREFIXES = {"do", "then", "else", "time", "exec", "!"}
# a value the reader replaces: DIR, RUN_DIR, N, S; runs/…; ${run#*:}; <demo>
PLACEHOLDER = re.compile(r"^[A-Z][A-Z0-9_]*$|…|\.\.\.|\$|^<.*>$")
ELISION = {"...", "…"}
# flags whose check needs this machine's hardware, not the page: dropped before vit-train's own checks
MACHINE_FLAGS = {"--device", "--decoder", "--fused-ffn"}


@dataclass
class Shown:
    """One command line as a page shows it: where (page, line, what holds it) and its text."""

    page: str
    line: int
    where: str  # "code block", "table cell" or "inline code"
    text: str

    def __str__(self) -> str:
        return f"{self.page}:{self.line} ({self.where}): {self.text}"


def shown_commands(path: Path) -> list[Shown]:
    """Every command line of a page: the lines of its fenced blocks (continuations joined, comments and `$ ` prompts
    cut), and its inline code spans, in tables and in prose. Which of them run a program of ours is decided later."""
    text = path.read_text()
    found = []
    fences = re.compile(r"^```([^\n]*)\n(.*?)^```", re.M | re.S)
    for m in fences.finditer(text):
        if m.group(1).strip() == "mermaid":
            continue
        first = text.count("\n", 0, m.start()) + 2
        lines = m.group(2).split("\n")
        joined, at = "", None
        for i, raw in enumerate(lines):
            at = first + i if at is None else at
            if raw.rstrip().endswith("\\"):
                joined += raw.rstrip()[:-1] + " "
                continue
            line = re.split(r"\s+#\s", " " + joined + raw, maxsplit=1)[0].strip()
            joined, start, at = "", at, None
            line = line[2:] if line.startswith("$ ") else line
            if line and not line.startswith("#"):
                found.append(Shown(path.name, start, "code block", line))
    prose = fences.sub(lambda m: "\n" * m.group(0).count("\n"), text)  # the same line numbers, no blocks
    for m in re.finditer(r"(?<!`)`([^`]+)`(?!`)", prose):
        line_start = prose.rfind("\n", 0, m.start()) + 1
        in_table = prose[line_start:].lstrip().startswith("|")
        snippet = " ".join(m.group(1).replace("\\|", "|").split())
        found.append(Shown(path.name, prose.count("\n", 0, m.start()) + 1, "table cell" if in_table else "inline code",
                           snippet))
    return found


def _words(text: str) -> list[list[str]]:
    """A command line as shell words, one list per command (split at &&, ;, |, parentheses and redirections)."""
    lexer = shlex.shlex(os.path.expandvars(text), posix=True, punctuation_chars="();<>|&")
    lexer.whitespace_split, lexer.commenters = True, ""  # comments are cut already; `${run#*:}` is no comment
    try:
        tokens = list(lexer)
    except ValueError:  # an unclosed quote: not a command line
        return []
    commands, current = [], []
    for token in tokens:
        if token in SEPARATORS:
            commands.append(current)
            current = []
        else:
            current.append(token)
    return [*commands, current]


def _program(words: list[str]) -> tuple[str, list[str]] | None:
    """(the program, its arguments) when ``words`` run one of ours; else None."""
    while words and (words[0] in PREFIXES or re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0])):
        words = words[1:]  # `do`, `TRITON_INTERPRET=1`, ...
    if not words:
        return None
    if words[0] in VIT:
        return words[0], words[1:]
    if words[0] in ("python", "python3") and len(words) > 1:
        if words[1:3] == ["-m", "trainer"]:
            return "python -m trainer", words[3:]
        if re.fullmatch(r"tools/\w+\.py", words[1]):
            return f"python {words[1]}", words[2:]
    if words[0] == "torchrun" and "-m" in words:
        i = words.index("-m")
        if words[i + 1:i + 2] == ["trainer"]:
            return "python -m trainer", words[i + 2:]
    return None


class _Parser(Exception):  # noqa: N818  (carries a parser out of a program's main)
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.parser = parser


def _parser_of(make: Callable[[], Any]) -> argparse.ArgumentParser:
    """The argparse parser that ``make`` (a program's main) builds: it is stopped where it would parse."""

    def stop(self: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
        raise _Parser(self)

    with mock.patch.object(argparse.ArgumentParser, "parse_args", stop):
        try:
            make()
        except _Parser as got:
            return got.parser
    raise AssertionError(f"{make} never parsed its command line")


def _tool_parser(name: str) -> argparse.ArgumentParser:
    if name == "run_stats":  # reads its arguments by hand: run directories, nothing else
        parser = argparse.ArgumentParser(prog="run_stats.py")
        parser.add_argument("run_dir", nargs="+")
        return parser
    main = _tool(name).main
    return _parser_of(lambda: main([]) if inspect.signature(main).parameters else main())


def _parsers() -> dict[str, Callable[[], argparse.ArgumentParser]]:
    """Each program's own parser, by the name the pages call it."""
    from pipelines import prepare
    from trainer import report
    from trainer.commands import eval_parser, export_parser, predict_parser
    from trainer.config import build_parser

    programs = {"vit-train": build_parser, "python -m trainer": build_parser, "vit-eval": eval_parser,
                "vit-predict": predict_parser, "vit-export": export_parser,
                "vit-prepare": lambda: _parser_of(lambda: prepare.parse_args([])),
                "vit-report": lambda: _parser_of(lambda: report.parse_args([]))}
    for script in sorted((REPO / "tools").glob("*.py")):
        if script.stem != "__init__":
            programs[f"python tools/{script.name}"] = lambda name=script.stem: _tool_parser(name)
    return programs


def _options(parser: argparse.ArgumentParser, argv: list[str]) -> dict[str, argparse.Action]:
    """The option strings ``parser`` knows for ``argv``: its own, and those of the sub-command ``argv`` names."""
    options = dict(parser._option_string_actions)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for word in argv:
                if word in action.choices:
                    options.update(_options(action.choices[word], []))
                    break
    return options


def _sample(action: argparse.Action | None) -> str | None:
    """A value ``action`` accepts, to stand for a placeholder (None: any text will do)."""
    if action is None or action.nargs == 0:
        return None
    if action.choices:
        return str(next(iter(action.choices)))
    if action.type is None or action.type in (str, Path):
        return None
    for candidate in ("1", "0.5", "1s", "32,64"):
        try:
            action.type(candidate)
            return candidate
        except Exception:  # noqa: BLE001  (a type function may raise anything: try the next)
            continue
    return None


def _flag(word: str) -> str:
    return word.split("=", 1)[0]


def _train_checks(argv: list[str], placeholders: set[str], elided: bool) -> str | None:
    """vit-train's own checks of the values (``trainer.config.parse_args``, as the command line calls it), and the
    rule that a run on one's own data says its --budget (the demo and the presets that set one keep theirs)."""
    from trainer import config
    from trainer.presets import load_preset

    given = {_flag(w) for w in argv if w.startswith("--")}
    if given & {"--resume", "--list-presets", "--help"} or elided:
        return None  # the run's own configuration; a request for text; a line with words left out
    checked, skip = [], False
    for word in argv:  # drop what stands for something else, and what only this machine's hardware decides
        if skip:
            skip = False
        elif _flag(word) in MACHINE_FLAGS | (placeholders - {"--data", "--out"}):
            skip = "=" not in word
        else:
            checked.append(word)
    strict = {"require_budget": True} if "require_budget" in inspect.signature(config.parse_args).parameters else {}
    try:
        cfg = config.parse_args(checked, **strict)
    except (config.ConfigError, config.ListPresets) as e:
        return str(e)
    except SystemExit:
        return "vit-train's parser refused it"
    own_budget = cfg.data == config.DEMO or (cfg.preset is not None and "budget" in load_preset(cfg.preset))
    if "--budget" not in given and not own_budget and not (cfg.check_gpu or cfg.profile):
        return "a run on your own data needs --budget (--budget 10m to try it, --budget 24h for the benchmark)"
    return None


def check_command(program: str, argv: list[str], parser: argparse.ArgumentParser) -> str | None:
    """Why ``argv`` is not a command line ``program`` takes, or None: its flags exist and its values parse."""
    elided = any(w in ELISION for w in argv)
    argv = [w for w in argv if w not in ELISION]
    options = _options(parser, argv)
    if any(w.startswith("[") for w in argv):  # a synopsis, `vit-eval RUN_DIR [--data DIR] …`: its flags exist
        unknown = [f for f in re.findall(r"(?<![\w-])--[a-z][\w-]*", " ".join(argv)) if f not in options]
        return f"unknown flag {unknown[0]}" if unknown else None
    argv, placeholders = list(argv), set()
    positionals = [a for a in parser._actions if not a.option_strings]
    at = 0  # the positional argument a word that is no flag's value fills
    for i, word in enumerate(argv):
        action = options.get(argv[i - 1]) if i else None
        if action is not None and action.nargs != 0:  # a flag's value
            if PLACEHOLDER.search(word):
                placeholders.add(argv[i - 1])
                argv[i] = _sample(action) or word
        elif not word.startswith("-"):
            if at < len(positionals) and PLACEHOLDER.search(word):
                argv[i] = _sample(positionals[at]) or word  # `make_registry_datasets.py NAME`: one of its names
            at += positionals[at].nargs not in ("+", "*") if at < len(positionals) else 0
    failure = io.StringIO()
    try:
        with contextlib.redirect_stderr(failure), contextlib.redirect_stdout(io.StringIO()):
            parsed = parser.parse_args(argv)
    except SystemExit as e:
        why = failure.getvalue().strip().splitlines()[-1] if e.code else None  # --help exits 0
        return None if elided and why and "arguments are required" in why else why  # left out, as `…` says
    if program in ("vit-train", "python -m trainer"):
        return _train_checks(argv, placeholders, elided)
    if program in ("vit-eval", "vit-predict", "vit-export"):
        from trainer.use import WEIGHTS, RunError, check_size

        if parsed.weights not in WEIGHTS:
            return f"--weights {parsed.weights}: not one of {', '.join(WEIGHTS)}"
        try:
            for size in str(parsed.image_size or 16).split(","):
                check_size("--image-size", int(size))
        except (RunError, ValueError) as e:
            return str(e)
    return None


def check_pages(pages: list[Path]) -> tuple[int, list[str]]:
    """(how many commands of our programs the pages show, what is wrong with them: one line each, naming the page,
    the line and the command)."""
    parsers: dict[str, argparse.ArgumentParser] = {}
    makers = _parsers()
    checked, problems = 0, []
    for page in pages:
        for shown in shown_commands(page):
            synopsis = "[-" in shown.text  # `vit-eval RUN_DIR [--split val|train]`: its | are no pipes
            for words in [shown.text.split()] if synopsis else _words(shown.text):
                found = _program(words)
                if found is None:
                    continue
                program, argv = found
                if program not in makers:
                    problems.append(f"{shown}: no such program ({program})")
                    continue
                if not argv:
                    continue  # the program's name in a sentence, not a command
                if program not in parsers:
                    parsers[program] = makers[program]()
                checked += 1
                if why := check_command(program, argv, parsers[program]):
                    problems.append(f"{shown}: {why}")
    return checked, problems


def test_every_command_the_pages_show_parses():
    """Every command of ours in the README and the docs (blocks, table cells, inline code), parsed by the program's
    own parser, vit-train's values by its own checks: a renamed flag, a bad value or a missing --budget fails here."""
    checked, problems = check_pages(PAGES)
    assert not problems, "\n".join(problems)
    assert checked >= 100, checked  # the pages hold far more: a checker that finds nothing would pass quietly


def _check_fixture(tmp_path: Path, text: str) -> tuple[int, list[str]]:
    page = tmp_path / "fixture.md"
    page.write_text(text)
    return check_pages([page])


def test_the_checker_fails_on_a_wrong_flag_in_a_table_cell(tmp_path):
    checked, problems = _check_fixture(tmp_path, "# A page\n\nRun `vit-eval runs/demo --image-size 96` first.\n\n"
                                       "| what | command |\n| --- | --- |\n"
                                       "| the demo | `vit-train --data demo --budget 3m --lerning-rate 1e-3` |\n"
                                       "| a folder | `vit-train --data my_images` |\n")
    assert checked == 3
    assert len(problems) == 2, problems
    assert problems[0].startswith("fixture.md:7 (table cell): vit-train --data demo --budget 3m --lerning-rate 1e-3:")
    assert "--lerning-rate" in problems[0]
    assert problems[1].startswith("fixture.md:8 (table cell): vit-train --data my_images:")
    assert "--budget" in problems[1]


def test_the_checker_reads_blocks_placeholders_and_synopses(tmp_path):
    checked, problems = _check_fixture(
        tmp_path, "```bash\nvit-train --data DIR --budget 10m \\\n    --model ${run#*:} --out runs/x  # a comment\n"
        "python tools/bench.py loop --size S --seconds 20 && vit-report runs/x --out DIR\n```\n\n"
        "`vit-eval RUN_DIR [--split val|train] [--image-size N[,N…]] [--wieghts auto|ema|raw]`\n"
        "`vit-export runs/x --image-size 100`\n")
    assert checked == 5, problems
    assert [p.split(": ", 1)[0] for p in problems] == ["fixture.md:7 (inline code)", "fixture.md:8 (inline code)"]
    assert "--wieghts" in problems[0] and "multiple" in problems[1]


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
