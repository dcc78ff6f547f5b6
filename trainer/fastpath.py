"""The fast paths and what each falls back to, decided where each first runs and recorded for the run.

Three fast paths are on by default on a CUDA machine, and each has a slower path that computes the same thing:

- ``step``: the whole training step captured in a CUDA graph (``--step graph``); it falls back to ``torch.compile``
  (or, without Triton for Inductor, to eager), and a compiled step whose first call fails falls back to eager;
- ``ffn``: the locality FFN's middle as one Triton kernel (``--fused-ffn on``); it falls back to PyTorch's ops;
- ``decoder``: DALI's mixed (nvJPEG) decoder (``--decoder mixed``); it falls back to DALI's CPU decoder for the
  stage, the batches then copied to the GPU.

A failure where a fast path first runs (a capture error, a kernel that does not compile or disagrees with PyTorch's
ops, a decoder that cannot allocate) costs one warning line and a ``fallback`` event in metrics.jsonl, not the run.
Asked for by name (not ``auto``) the line is louder; with ``--strict-fast-paths`` the run ends instead (exit 2), for
benchmarks that must time the path they name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

PATHS = {"step": "--step", "ffn": "--fused-ffn", "decoder": "--decoder"}  # fast path -> the flag that picks it


class FastPathError(RuntimeError):
    """A fast path failed under --strict-fast-paths (the run ends with exit status 2)."""


def one_line(error: BaseException | str, limit: int = 240) -> str:
    """An error as one line: its type and the first non-empty line of its message, cut to ``limit`` characters."""
    if isinstance(error, str):
        text = error
    else:
        lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
        text = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass
class FastPaths:
    """What the run asked for, what runs now and what fell back.

    ``asked``: each path's flag value as given (``auto`` or a name); ``running``: what runs now, per path;
    ``log(event, **fields)``: the run's event stream; ``say(text, loud)``: one console line; ``where()``: the step
    and stage now (for the event)."""

    asked: dict[str, str]
    running: dict[str, Any]
    strict: bool = False
    log: Callable[..., None] = lambda event, **fields: None
    say: Callable[[str, bool], None] = lambda text, loud: None
    where: Callable[[], dict[str, Any]] = dict
    events: list[dict[str, Any]] = field(default_factory=list)
    _said: set[tuple[str, str, str]] = field(default_factory=set)  # (path, to, error) lines already printed

    def fell_back(self, path: str, failed: Any, to: Any, error: BaseException | str, why: str = "") -> None:
        """``path`` could not run as ``failed``; ``to`` runs from now on. ``why``: what makes ``to`` the choice.

        Raises FastPathError under --strict-fast-paths; else one line (loud when the path was asked for by name)
        and a ``fallback`` event (each time; the line once per failure)."""
        reason = one_line(error)
        flag = PATHS[path]
        if self.strict:
            raise FastPathError(f"{flag} {_show(failed)} failed ({reason}) and --strict-fast-paths forbids the "
                                f"fallback to {_show(to)}")
        self.running[path] = to
        explicit = self.asked.get(path, "auto") != "auto"
        event = {"path": path, "failed": failed, "to": to, "error": reason, **({"why": why} if why else {}),
                 "explicit": explicit, **self.where()}
        self.events.append(event)
        self.log("fallback", **event)
        if (path, str(to), reason) in self._said:  # the same failure again (the val pipeline, the next stage)
            return
        self._said.add((path, str(to), reason))
        because = f" ({why})" if why else ""
        line = f"{_label(path, failed)} failed: {reason}; running {_label(path, to)} instead{because}"
        if explicit:
            line = (f"WARNING: you asked for {flag} {self.asked[path]}, but {line}. Add --strict-fast-paths to stop "
                    f"instead, or see docs/troubleshooting.md")
        else:
            line = f"warning: {line}"
        self.say(line, explicit)


def _show(value: Any) -> str:
    return {True: "on", False: "off"}.get(value, str(value)) if isinstance(value, bool) else str(value)


def _label(path: str, value: Any) -> str:
    if path == "ffn":
        return "the fused FFN kernel" if value else "PyTorch's FFN ops"
    if path == "decoder":
        return f"the {value} decoder"
    return {"graph": "the captured step", "compile": "the compiled step", "eager": "the eager step"}.get(
        value, f"step {value}")
