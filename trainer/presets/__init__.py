"""Named configurations (YAML files beside this module): the rows of the paper's Table 1, and our own."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

FOLDER = Path(__file__).parent


class PresetError(ValueError):
    """Unknown preset, or a preset file that names an unknown flag."""


def preset_names() -> list[str]:
    return sorted(p.stem for p in FOLDER.glob("*.yaml"))


def describe_presets() -> list[str]:
    """One line per preset: its name and the first line of its description."""
    lines = []
    for name in preset_names():
        text = yaml.safe_load((FOLDER / f"{name}.yaml").read_text())
        lines.append(f"{name:<24} {text.get('description', '').strip().splitlines()[0]}")
    return lines


def preset_path(name: str) -> Path:
    return FOLDER / f"{name}.yaml"


def load_preset(name: str) -> dict[str, Any]:
    """The preset's flag values by argparse dest (``image_size``, ``budget``, ...), without its description."""
    path = preset_path(name)
    if not path.is_file():
        raise PresetError(f"--preset: unknown preset {name!r}; choose from {', '.join(preset_names())}")
    values = yaml.safe_load(path.read_text()) or {}
    values.pop("description", None)
    return {"preset": name, **values}
