"""Checkpoints: written atomically (temp file, fsync, rename), the last two kept, loaded with weights_only=True."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipelines.files import atomic_file

KEEP = 2
PREFIX, SUFFIX = "ckpt-", ".pt"


class NoCheckpointError(RuntimeError):
    """A resume found no readable checkpoint."""


@dataclass(frozen=True)
class Loaded:
    path: Path
    payload: dict[str, Any]
    skipped: tuple[tuple[Path, str], ...]  # newer checkpoints that could not be read, and why


def save_checkpoint(folder: Path, step: int, payload: dict[str, Any], keep: int = KEEP) -> Path:
    """Write ``payload`` as ``ckpt-<step>.pt``; a crash at any moment leaves only whole files behind."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{PREFIX}{step:09d}{SUFFIX}"
    with atomic_file(path) as tmp:
        torch.save(payload, tmp)
    for old in list_checkpoints(folder)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def list_checkpoints(folder: Path) -> list[Path]:
    """Oldest first (the step is zero-padded into the name)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.name.startswith(PREFIX) and p.name.endswith(SUFFIX))


def load_checkpoint(path: Path) -> dict[str, Any]:
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or "model" not in payload:
        raise ValueError("not a vit-train checkpoint")
    return payload


def load_latest(folder: Path) -> Loaded:
    """The newest checkpoint that loads; newer ones that do not are reported in ``skipped``."""
    skipped: list[tuple[Path, str]] = []
    for path in reversed(list_checkpoints(folder)):
        try:
            return Loaded(path, load_checkpoint(path), tuple(skipped))
        except Exception as e:  # truncated zip, bad pickle, wrong content: try the one before
            skipped.append((path, f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"))
    where = "; ".join(f"{p.name} ({why})" for p, why in skipped)
    raise NoCheckpointError(f"no readable checkpoint in {folder}" + (f": {where}" if where else ""))


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
