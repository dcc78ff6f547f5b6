"""The live readout: a rich panel refreshed a few times a second on a terminal, plain lines otherwise."""

from __future__ import annotations

import sys
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


class Readout:
    """Shows the latest numbers the loop reports. The loop calls ``update``; rendering never syncs the device."""

    def __init__(self, budget_s: float, clock: Any, live: bool | None = None, console: Console | None = None) -> None:
        self.budget_s, self.clock = budget_s, clock
        self.console = console or Console(file=sys.stdout)
        self.live = self.console.is_terminal if live is None else live
        self.state: dict[str, Any] = {}
        self._live: Live | None = None

    def __enter__(self) -> Readout:
        if self.live:
            self._live = Live(get_renderable=self._render, console=self.console, refresh_per_second=4, transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._live is not None:
            self._live.__exit__(*exc)
            self._live = None

    def message(self, text: str) -> None:
        self.console.print(text, highlight=False, soft_wrap=True)

    def warn(self, text: str, loud: bool = False) -> None:
        """A warning line: yellow, or (``loud``: a fast path asked for by name did not run) bold red and also on
        stderr when the readout's console is not there, so a redirected log and the terminal both show it."""
        self.console.print(text, style="bold red" if loud else "yellow", highlight=False, soft_wrap=True,
                           markup=False)
        if loud and self.console.file is not sys.stderr and sys.stderr.isatty():
            print(text, file=sys.stderr, flush=True)

    def update(self, **fields: Any) -> None:
        self.state.update(fields)
        if not self.live:
            self.console.print(self._line(), highlight=False, soft_wrap=True)

    def _values(self) -> dict[str, str]:
        s, elapsed = self.state, self.clock()
        return {
            "epoch": f"{s.get('epoch', 0)}",
            "stage": f"{s.get('stage', 0)}",
            "size": f"{s.get('image_size', '-')} px",
            "batch": f"{s.get('batch_size', '-')}",
            "step": f"{s.get('step', 0)}",
            "img/s": f"{s['images_per_sec']:.0f}" if "images_per_sec" in s else "-",
            "data wait": f"{100 * s['data_wait']:.0f}%" if "data_wait" in s else "-",
            "TFLOP/s": f"{s['tflops']:.2f}" if "tflops" in s else "-",
            "MFU": f"{100 * s['mfu']:.1f}%" if s.get("mfu") is not None else "-",
            "mem GiB": f"{s['mem_gib']:.1f}/{s['mem_peak_gib']:.1f}" if "mem_gib" in s else "-",
            "loss": f"{s['loss']:.4f}" if "loss" in s else "-",
            "lr": f"{s['lr']:.2e}" if "lr" in s else "-",
            "val top1": f"{100 * s['top1']:.1f}%" if "top1" in s else "-",
            "epochs (proj.)": f"{s['projected_epochs']:.1f}" if "projected_epochs" in s else "-",
            "budget": f"{_duration(elapsed)} / {_duration(self.budget_s)} ({_duration(self.budget_s - elapsed)} left)",
        }

    def _line(self) -> str:
        return "  ".join(f"{k} {v}" for k, v in self._values().items())

    def _render(self) -> Table:
        table = Table(title="vit-train", show_header=True, header_style="bold")
        values = self._values()
        for key in values:
            table.add_column(key, justify="right")
        table.add_row(*values.values())
        return table
