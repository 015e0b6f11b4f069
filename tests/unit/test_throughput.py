"""FLOPs counting against closed forms, the peak table lookup, and MFU arithmetic."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from latentpipe.training.throughput import PEAK_FLOPS_ENV, flops_per_sample, mfu, peak_flops, peak_for_name


def test_linear_forward_backward_flops_match_closed_form() -> None:
    # y = x W^T: forward 2*B*I*O; backward grad_x and grad_W are 2*B*I*O each -> 6*B*I*O.
    b, i, o = 5, 12, 7
    layer = nn.Linear(i, o)
    x = torch.randn(b, i, requires_grad=True)

    per_sample = flops_per_sample(lambda: layer(x).sum().backward(), batch_size=b)

    assert per_sample == 6 * i * o


def test_input_without_grad_counts_only_weight_gradient() -> None:
    b, i, o = 4, 8, 3
    layer = nn.Linear(i, o)
    x = torch.randn(b, i)  # no grad wrt the data: backward computes grad_W only

    assert flops_per_sample(lambda: layer(x).sum().backward(), batch_size=b) == 4 * i * o


def test_conv_flops_scale_with_output_positions() -> None:
    # Conv2d 3x3, C_in -> C_out, stride 1, padding 1 on HxW: forward 2*H*W*C_out*C_in*9 per sample.
    c_in, c_out, h, w = 2, 4, 6, 5
    conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
    x = torch.randn(3, c_in, h, w)

    with torch.no_grad():
        fwd = flops_per_sample(lambda: conv(x), batch_size=3)

    assert fwd == 2 * h * w * c_out * c_in * 9


def test_batch_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        flops_per_sample(lambda: None, batch_size=0)


@pytest.mark.parametrize(
    ("name", "dtype", "expected"),
    [
        ("NVIDIA H100 80GB HBM3", torch.bfloat16, 989e12),
        ("NVIDIA H100 PCIe", torch.bfloat16, 756e12),
        ("NVIDIA H200", torch.float16, 989e12),
        ("NVIDIA A100-SXM4-80GB", torch.bfloat16, 312e12),
        ("NVIDIA L4", torch.bfloat16, 121e12),
        ("NVIDIA L40S", torch.bfloat16, 362e12),
        ("Tesla V100-SXM2-16GB", torch.bfloat16, None),  # no bf16 on Volta
        ("NVIDIA A10G", torch.bfloat16, None),
        ("Some Future Accelerator", torch.bfloat16, None),
    ],
)
def test_peak_table_lookup(name: str, dtype: torch.dtype, expected: float | None) -> None:
    assert peak_for_name(name, dtype) == expected


def test_fp32_peak_follows_tf32_setting() -> None:
    assert peak_for_name("NVIDIA A100-SXM4-40GB", torch.float32, tf32=True) == 156e12
    assert peak_for_name("Tesla T4", torch.float32, tf32=True) == 8.1e12  # no TF32 cores: the fp32 peak
    assert peak_for_name("NVIDIA A100-SXM4-40GB", torch.float32, tf32=False) == 19.5e12
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        assert peak_for_name("NVIDIA H100 80GB HBM3", torch.float32) == 494e12
        torch.set_float32_matmul_precision("highest")
        assert peak_for_name("NVIDIA H100 80GB HBM3", torch.float32) == 67e12
    finally:
        torch.set_float32_matmul_precision(before)


def test_cpu_has_no_peak_unless_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PEAK_FLOPS_ENV, raising=False)
    assert peak_flops("cpu") is None
    monkeypatch.setenv(PEAK_FLOPS_ENV, "2.5e12")
    assert peak_flops("cpu") == 2.5e12
    monkeypatch.setenv(PEAK_FLOPS_ENV, "fast")
    with pytest.raises(ValueError, match=PEAK_FLOPS_ENV):
        peak_flops("cpu")


def test_mfu_is_achieved_over_peak_times_world() -> None:
    # 1000 samples/s * 3e9 FLOPs = 3e12 FLOP/s achieved over 2 devices of 6e12: 0.25.
    assert mfu(1000.0, 3e9, 6e12, 2) == pytest.approx(0.25)
    with pytest.raises(ValueError):
        mfu(1.0, 1.0, 0.0, 1)
