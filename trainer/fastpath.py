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


class RunPaths(FastPaths):
    """The fast paths of one training run: the fallbacks hooked into its step and loaders, the fused FFN checked
    at each stage's shapes, and what ran at each stage (``stages``, for the summary)."""

    def __init__(self, cfg: Any, mode: str, nets: list[Any], patch: int, dtype: Any, **kwargs: Any) -> None:
        """``mode``: the step mode resolved from --step; ``nets``: the trained model (and its EMA copy), whose
        FFNs say whether --fused-ffn resolved to the kernel; ``dtype``: what the FFN computes in (autocast's)."""
        fused = any(getattr(m, "fused", False) for m in nets[0].modules())
        super().__init__(asked={"step": cfg.step, "ffn": cfg.fused_ffn, "decoder": cfg.decoder},
                         running={"step": mode, "ffn": fused, "decoder": None}, strict=cfg.strict_fast_paths,
                         **kwargs)
        self.nets, self.patch, self.dtype = nets, patch, dtype
        self.stages: list[dict[str, Any]] = []

    def cannot_run(self, note: str) -> None:
        """A path asked for by name that cannot run on this machine at all (``--step graph`` on the CPU): loud,
        or under --strict-fast-paths, the end."""
        if self.strict:
            raise FastPathError(f"{note} (--strict-fast-paths forbids it)")
        self.events.append({"path": "step", "failed": self.asked["step"], "to": self.running["step"],
                            "error": note, "explicit": True, **self.where()})
        self.log("fallback", **self.events[-1])
        self.say(f"WARNING: {note}", True)

    def enter_stage(self, stage: int, image_size: int, batch: int, decoder: str | None) -> None:
        """At a stage's entry: the fused FFN checked at its shapes, then what runs there recorded."""
        if self.running["ffn"]:
            self.check_ffn(image_size, batch)
        self.running["decoder"] = decoder
        self.stages.append({"stage": stage, "image_size": image_size, "step_mode": self.running["step"],
                            "fused_ffn": self.running["ffn"], "decoder": decoder})

    def check_ffn(self, size: int, batch: int) -> None:
        """The fused kernels, forward and backward, once at a stage's batch, grid and dtype (the shapes Triton
        compiles them for) against PyTorch's ops on the same input (``model.fused_ffn.self_check``): an error, or a
        result off by more than the dtype's tolerance, and every locality FFN (the EMA copy's too) runs PyTorch's
        ops for the rest of the run."""
        from model import fused_ffn
        from model.locality_vit import LocalityFeedForward, set_fused

        net = self.nets[0]
        ffn = next(m for m in net.modules() if isinstance(m, LocalityFeedForward))
        side = size // self.patch
        problem: BaseException | str | None
        try:
            _, problem = fused_ffn.disagreement(ffn.dwconv.weight, batch, (side, side),
                                                getattr(net, "num_prefix_tokens", 1), self.dtype, seed=size)
        except Exception as e:  # noqa: BLE001 - a Triton compile or launch error: reported, then passed by
            problem = e
        if problem is None:
            return
        self.fell_back("ffn", True, False, problem)
        for module in self.nets:
            set_fused(module, False)

    def step_fell_back(self, failed: str, to: str, error: BaseException, why: str) -> None:
        """TrainStep's fallback: recorded (or, under --strict-fast-paths, refused), then the step runs as ``to``."""
        self.fell_back("step", failed, to, error, why)
        if self.stages:
            self.stages[-1]["step_mode"] = to

    def decoder_fell_back(self, which: str) -> Callable[[str, str, BaseException], None]:
        """The loaders' fallback: this stage's ``which`` pipeline decodes on the CPU."""

        def fell_back(failed: str, to: str, error: BaseException) -> None:
            self.fell_back("decoder", failed, to, error, f"the {which} pipeline at this stage; the next stage "
                                                         "tries the GPU decoder again")
            stage = self.where().get("stage")
            if which == "train" and self.stages and self.stages[-1]["stage"] == stage:
                self.stages[-1]["decoder"] = to

        return fell_back
