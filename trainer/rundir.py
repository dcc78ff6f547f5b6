"""The run directory: config.json and summary.json written atomically, metrics.jsonl appended a line at a time."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()  # what open() would give; mkstemp's 0600 would hide run files from other users


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, rename: readers see the old file or the new, never half."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, obj: Any) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def save_safetensors_atomic(tensors: dict[str, Any], path: Path) -> None:
    """The final weights as safetensors (loadable without pickle anywhere), written via temp file and rename."""
    from safetensors.torch import save_file

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp)
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class RunDir:
    """One run's folder. Created only once the config and the data have been checked.

    Its one event stream: each ``log`` line goes to metrics.jsonl (the record), then to the trackers, if the run
    has any (``trainer.track.Tracking``: queued, never waited on); so do the config, the summary and the close."""

    def __init__(self, path: Path, tracking: Any = None) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        self._metrics = open(path / "metrics.jsonl", "a", buffering=1)  # line-buffered: a crash loses one line
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
