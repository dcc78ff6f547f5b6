"""The product's code stays short enough to read top to bottom: no function in trainer/ or pipelines/ over 60 lines,
and the training loop's class (``Trainer``) within 250 lines, its other concerns in components."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("trainer", "pipelines")
MAX_FUNCTION_LINES = 60
MAX_TRAINER_LINES = 250


def _span(node: ast.AST) -> int:
    return node.end_lineno - node.lineno + 1


def test_no_function_in_trainer_or_pipelines_is_longer_than_60_lines():
    long = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _span(node) > MAX_FUNCTION_LINES:
                    long.append(f"{package}/{path.name}:{node.lineno} {node.name} ({_span(node)} lines)")
    assert not long, long


def test_the_trainer_class_is_the_loop_only():
    tree = ast.parse((ROOT / "trainer" / "loop.py").read_text())
    [trainer] = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Trainer"]
    assert _span(trainer) <= MAX_TRAINER_LINES, f"Trainer is {_span(trainer)} lines"
