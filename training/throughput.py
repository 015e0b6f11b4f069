"""Throughput as model FLOPs utilisation (MFU, PaLM appendix B; Chowdhery et al. 2022).

FLOPs per sample are counted once, by running one forward + backward of the real model
under ``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions and attention;
elementwise ops are not counted, as in the MFU convention). The device's peak comes
from a table of dense (no sparsity) tensor-core peaks in the vendors' datasheets, keyed
by device name and compute dtype; ``LATENTPIPE_PEAK_FLOPS`` overrides it (e.g. on CPU,
where there is no meaningful table entry and ``peak_flops`` returns None).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

PEAK_FLOPS_ENV = "LATENTPIPE_PEAK_FLOPS"

# Dense peak FLOP/s per device from NVIDIA datasheets (SXM parts unless the name says
# otherwise). Keys are matched as substrings of torch.cuda.get_device_name(), longest first,
# so "H100 PCIe" wins over "H100". dtype keys: bf16, fp16, tf32, fp32.
_T = 1e12
PEAK_TABLE: dict[str, dict[str, float]] = {
    "B200": {"bf16": 2250 * _T, "fp16": 2250 * _T, "tf32": 1100 * _T, "fp32": 75 * _T},
    "H200": {"bf16": 989 * _T, "fp16": 989 * _T, "tf32": 494 * _T, "fp32": 67 * _T},
    "GH200": {"bf16": 989 * _T, "fp16": 989 * _T, "tf32": 494 * _T, "fp32": 67 * _T},
    "H100 NVL": {"bf16": 835 * _T, "fp16": 835 * _T, "tf32": 418 * _T, "fp32": 60 * _T},
    "H100 PCIe": {"bf16": 756 * _T, "fp16": 756 * _T, "tf32": 378 * _T, "fp32": 51 * _T},
    "H100": {"bf16": 989 * _T, "fp16": 989 * _T, "tf32": 494 * _T, "fp32": 67 * _T},
    "H800": {"bf16": 989 * _T, "fp16": 989 * _T, "tf32": 494 * _T, "fp32": 67 * _T},
    "A100": {"bf16": 312 * _T, "fp16": 312 * _T, "tf32": 156 * _T, "fp32": 19.5 * _T},
    "A800": {"bf16": 312 * _T, "fp16": 312 * _T, "tf32": 156 * _T, "fp32": 19.5 * _T},
    "L40S": {"bf16": 362 * _T, "fp16": 362 * _T, "tf32": 183 * _T, "fp32": 91.6 * _T},
    "L40": {"bf16": 181 * _T, "fp16": 181 * _T, "tf32": 90.5 * _T, "fp32": 90.5 * _T},
    "L4": {"bf16": 121 * _T, "fp16": 121 * _T, "tf32": 60 * _T, "fp32": 30.3 * _T},
    "A10G": {},  # AWS part without published tensor peaks: unknown, not the A10's
    "A10": {"bf16": 125 * _T, "fp16": 125 * _T, "tf32": 62.5 * _T, "fp32": 31.2 * _T},
    "V100": {"fp16": 125 * _T, "fp32": 15.7 * _T},
    "T4": {"fp16": 65 * _T, "fp32": 8.1 * _T},
}

_DTYPE_KEYS = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def flops_per_sample(fn: Callable[[], Any], batch_size: int) -> float:
    """FLOPs of one sample: run ``fn`` (one forward + backward on a batch of ``batch_size``) once, counted.

    ``fn`` should do exactly what a training step does to the model (e.g.
    ``lambda: loss_fn(model, batch).backward()``); gradients it leaves are the caller's to zero.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return float(counter.get_total_flops()) / batch_size


def _dtype_key(dtype: torch.dtype, tf32: bool | None) -> str:
    if dtype not in _DTYPE_KEYS:
        raise ValueError(f"no peak FLOPs for dtype {dtype} (use bfloat16, float16 or float32)")
    key = _DTYPE_KEYS[dtype]
    if tf32 is None:  # torch's own switch: "high"/"medium" let fp32 matmuls use TF32 tensor cores
        tf32 = torch.get_float32_matmul_precision() != "highest"
    if key == "fp32" and tf32:
        return "tf32"
    return key


def peak_for_name(name: str, dtype: torch.dtype = torch.bfloat16, tf32: bool | None = None) -> float | None:
    """Dense peak FLOP/s for a device called ``name`` (e.g. "NVIDIA H100 80GB HBM3"), or None if unknown.

    For float32, ``tf32`` says whether matmuls run on TF32 tensor cores (None: torch's current
    ``get_float32_matmul_precision()``).
    """
    key = _dtype_key(dtype, tf32)
    for model in sorted(PEAK_TABLE, key=len, reverse=True):
        if model.lower() in name.lower():
            table = PEAK_TABLE[model]
            if key == "tf32" and key not in table:
                key = "fp32"  # no TF32 tensor cores (V100, T4): fp32 matmuls run at the fp32 peak
            return table.get(key)
    return None


def peak_flops(device: torch.device | str, dtype: torch.dtype = torch.bfloat16) -> float | None:
    """Peak FLOP/s of one ``device`` at ``dtype``: $LATENTPIPE_PEAK_FLOPS, else the table, else None.

    CPUs and unknown accelerators give None unless the environment variable is set.
    """
    env = os.environ.get(PEAK_FLOPS_ENV)
    if env:
        try:
            value = float(env)
        except ValueError:
            raise ValueError(f"{PEAK_FLOPS_ENV}: expected FLOP/s as a number, got {env!r}") from None
        if value <= 0:
            raise ValueError(f"{PEAK_FLOPS_ENV}: must be > 0, got {env!r}")
        return value
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        return None
    return peak_for_name(torch.cuda.get_device_name(dev), dtype)


def mfu(samples_per_s: float, flops_per_sample: float, peak: float, world: int) -> float:
    """Model FLOPs utilisation in [0, 1]: achieved FLOP/s over ``world`` devices' peak.

    ``samples_per_s`` is the global rate (all ranks together); ``peak`` is one device's peak
    FLOP/s (from ``peak_flops``; when that is None the MFU is unknown: do not call).
    """
    if peak <= 0 or world < 1:
        raise ValueError(f"peak must be > 0 and world >= 1, got {peak}, {world}")
    return samples_per_s * flops_per_sample / (peak * world)


__all__ = ["PEAK_FLOPS_ENV", "PEAK_TABLE", "flops_per_sample", "mfu", "peak_flops", "peak_for_name"]
