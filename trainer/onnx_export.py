"""A run's model as ONNX, through PyTorch's exporter, checked after writing by ONNX Runtime against PyTorch on a
batch of the run's own val images (the locality FFN exports through its PyTorch ops: the fused kernel is off)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipelines.files import atomic_file
from trainer.use import OpenedRun

CHECK_BATCH = 8


def sample_batch(run: OpenedRun, size: int) -> Any:
    """Up to CHECK_BATCH val images of the run's data, through the evaluation's pipeline (else, when the data
    folder is gone, normalized noise: the check still compares the two runtimes)."""
    import torch

    from pipelines import DatasetError, StageLoader, open_dataset
    from trainer.data import stage_spec

    try:
        _, val = open_dataset(str(run.data_root)) if run.data_root else (None, None)
    except DatasetError:
        val = None
    if val is None:
        return torch.randn(CHECK_BATCH, 3, size, size, generator=torch.Generator().manual_seed(0)), "noise"
    cpu = torch.device("cpu")
    loader = StageLoader(val, stage_spec(run.cfg, cpu, size, min(CHECK_BATCH, len(val)), train=False), train=False,
                         device=cpu)
    images, _ = next(iter(loader))
    loader.close()
    return images.contiguous(), "val images"


def export_onnx(run: OpenedRun, out: Path, size: int, dynamic_batch: bool = False) -> float:
    """Write ``out`` (atomically) and return the largest absolute logit difference, ONNX Runtime vs PyTorch."""
    import onnxruntime
    import torch

    net = run.build()
    images, _ = sample_batch(run, size)
    kwargs: dict[str, Any] = {"input_names": ["images"], "output_names": ["logits"], "dynamo": True,
                              "verbose": False}
    if dynamic_batch:
        kwargs["dynamic_shapes"] = {"x": {0: torch.export.Dim("batch", min=1, max=4096)}}
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out, suffix=".onnx") as tmp, torch.inference_mode(False), torch.no_grad():
        program = torch.onnx.export(net, (images,), None, **kwargs)
        program.save(tmp)
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    check = images if not dynamic_batch else images[: max(1, len(images) - 1)]  # another batch size than traced
    got = session.run(["logits"], {"images": check.numpy()})[0]
    with torch.no_grad():
        want = net(check).numpy()
    return float(abs(got - want).max())
