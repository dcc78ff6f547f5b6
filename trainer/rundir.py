"""The run directory: config.json and summary.json written atomically, metrics.jsonl appended a line at a time
(``RunDir.log``) and read back by ``read_events``, its one reader."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipelines.files import atomic_file, write_json_atomic
from pipelines.files import write_bytes_atomic as write_bytes_atomic  # the run's other files (commands, report)

METRICS = "metrics.jsonl"


def save_safetensors_atomic(tensors: dict[str, Any], path: Path) -> None:
    """The final weights as safetensors (loadable without pickle anywhere), written via temp file and rename."""
    from safetensors.torch import save_file

    with atomic_file(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp)


def read_events(run_dir: Path) -> list[dict[str, Any]]:
    """The events ``RunDir.log`` wrote to ``run_dir``/metrics.jsonl, in order ([] when there is no such file). A line
    that is not a JSON object is skipped: the one a crash cut short (a resumed run appends after it)."""
    try:
        text = (Path(run_dir) / METRICS).read_text()
    except FileNotFoundError:
        return []
    events = []
    for line in text.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict):
            events.append(event)
    return events


class RunDir:
    """One run's folder. Created only once the config and the data have been checked.

    Its one event stream: each ``log`` line goes to metrics.jsonl (the record), then to the trackers, if the run
    has any (``trainer.track.Tracking``: queued, never waited on); so do the config, the summary and the close."""

    def __init__(self, path: Path, tracking: Any = None) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        self._metrics = open(path / METRICS, "a", buffering=1)  # line-buffered: a crash loses one line
        self.tracking = tracking(path) if callable(tracking) else tracking  # made once the folder exists

    def write_config(self, config: dict[str, Any]) -> None:
        write_json_atomic(self.path / "config.json", config)
        if self.tracking:
            self.tracking.write_config(config)

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_json_atomic(self.path / "summary.json", summary)
        if self.tracking:
            self.tracking.write_summary(summary)

    def log(self, event: str, **fields: Any) -> None:
        self._metrics.write(json.dumps({"event": event, **fields}) + "\n")
        self._metrics.flush()
        if self.tracking:
            self.tracking.event(event, fields)

    def close(self) -> None:
        """Idempotent: every exit path closes, and a last ``finally`` closes whatever an unexpected error left."""
        if not self._metrics.closed:
            self._metrics.close()
        if self.tracking:
            tracking, self.tracking = self.tracking, None
            tracking.close()


class NullRunDir(RunDir):
    """A data-parallel rank other than 0: it knows the run's folder and writes nothing there (rank 0 writes)."""

    def __init__(self, path: Path) -> None:  # no folder made, no metrics file opened
        self.path = path

    def write_config(self, config: dict[str, Any]) -> None:
        pass

    def write_summary(self, summary: dict[str, Any]) -> None:
        pass

    def log(self, event: str, **fields: Any) -> None:
        pass

    def close(self) -> None:
        pass
