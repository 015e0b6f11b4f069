"""The one pixel <-> model-range mapping (latentpipe.preprocessing.pixels)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from latentpipe.preprocessing.pixels import grid, to_uint8, to_unit, to_unit_tensor


def test_round_trip_is_exact_for_every_level() -> None:
    a = np.arange(256 * 3, dtype=np.int64).reshape(1, 16, 16, 3).__mod__(256).astype(np.uint8)
    x = to_unit(a)
    assert x.dtype == np.float32 and x.shape == (1, 3, 16, 16)
    assert x.min() == -1.0 and x.max() == 1.0
    np.testing.assert_array_equal(to_uint8(torch.from_numpy(x)), a)
    # The same floats as torch's x / 127.5 - 1 (what diffusers pipelines and the tests compute).
    ref = torch.from_numpy(a).permute(0, 3, 1, 2).float() / 127.5 - 1
    assert torch.equal(to_unit_tensor(a), ref)


def test_out_of_range_outputs_are_clamped_and_single_images_work() -> None:
    x = torch.tensor([-3.0, -1.0, 0.0, 1.0, 7.0]).view(1, 5, 1).expand(3, 5, 1)  # [3, H=5, W=1]
    assert to_uint8(x)[:, 0, :].tolist() == [[0] * 3, [0] * 3, [128] * 3, [255] * 3, [255] * 3]


def test_rejects_what_is_not_uint8_rgb() -> None:
    with pytest.raises(ValueError, match="uint8 images"):
        to_unit(np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="uint8 images"):
        to_unit(np.zeros((2, 8, 8, 4), np.uint8))


def test_grid_rows_and_scale() -> None:
    a, b = torch.zeros(5, 3, 4, 6), torch.ones(5, 3, 4, 6)
    img = grid([a, b], n=3, scale=2)
    assert img.size == (3 * 6 * 2, 2 * 4 * 2)
    arr = np.asarray(img)
    assert (arr[:8] == 128).all() and (arr[8:] == 255).all()
