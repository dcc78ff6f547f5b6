"""What the training device can do at best: dense bf16/fp16 tensor-core peaks, for MFU."""

from __future__ import annotations

import torch

# Dense (no sparsity) bf16/fp16 peaks in FLOP/s from the vendors' datasheets, matched by substring of the
# device name, most specific first.
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100", 989.4e12),
    ("H200", 989.4e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10", 125e12),
    ("V100", 125e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
)


def peak_flops(device: torch.device) -> float | None:
    """The device's peak, or None when unknown (any CPU, an unlisted GPU): MFU is then not reported."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_FLOPS if key in name), None)
