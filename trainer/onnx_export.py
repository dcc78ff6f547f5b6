"""A run's model as ONNX, through PyTorch's exporter, checked after writing by ONNX Runtime against PyTorch on a
batch of the run's own val images (the locality FFN exports through its PyTorch ops: the fused kernel is off)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipelines.files import atomic_file
from trainer.use import OpenedRun

CHECK_BATCH = 8


def sample_batch(run: OpenedRun, size: int, count: int = CHECK_BATCH) -> Any:
    """``count`` images: the run's val images (up to CHECK_BATCH of them, repeated as needed) through the
    evaluation's pipeline, else, when the data folder is gone, normalized noise: the check still compares the two
    runtimes."""
    import torch

    from pipelines import DatasetError, StageLoader, open_dataset
    from trainer.data import stage_spec

    try:
        _, val = open_dataset(str(run.data_root)) if run.data_root else (None, None)
    except DatasetError:
        val = None
    if val is None:
        return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(0)), "noise"
    cpu = torch.device("cpu")
    loader = StageLoader(val, stage_spec(run.cfg, cpu, size, min(CHECK_BATCH, len(val), count), train=False),
                         train=False, device=cpu)
    images, _ = next(iter(loader))
    loader.close()
    return images.repeat(-(-count // len(images)), 1, 1, 1)[:count].contiguous(), "val images"


def export_onnx(run: OpenedRun, out: Path, size: int, static_batch: int | None = None) -> tuple[float, list[int]]:
    """Write ``out`` (atomically): a model for any batch size, or for ``static_batch`` images alone. Returns the
    largest absolute logit difference, ONNX Runtime vs PyTorch, and the batch sizes it was checked at (a dynamic
    model: 1 and the traced batch, CHECK_BATCH)."""
    import onnxruntime
    import torch

    net = run.build()
    images, _ = sample_batch(run, size, static_batch or CHECK_BATCH)
    kwargs: dict[str, Any] = {"input_names": ["images"], "output_names": ["logits"], "dynamo": True,
                              "verbose": False}
    if static_batch is None:
        kwargs["dynamic_shapes"] = {"x": {0: torch.export.Dim("batch", min=1, max=4096)}}
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out, suffix=".onnx") as tmp, torch.inference_mode(False), torch.no_grad():
        program = torch.onnx.export(net, (images,), None, **kwargs)
        program.save(tmp)
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    batches = [len(images)] if static_batch else [1, len(images)]  # dynamic: also a batch size it was not traced at
    diff = 0.0
    for batch in batches:
        got = session.run(["logits"], {"images": images[:batch].numpy()})[0]
        with torch.no_grad():
            diff = max(diff, float(abs(got - net(images[:batch]).numpy()).max()))
    return diff, batches
