"""Third-party print noise is dropped by its exact text; every other line gets through, in order."""

from __future__ import annotations

import pytest

from latentpipe.training.monitor import drop_known_prints


def test_only_the_known_lines_are_dropped(capsys: pytest.CaptureFixture[str]) -> None:
    with drop_known_prints("deepspeed_shm_comm_op built successfully"):
        print("first")
        print("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully")
        print("a real warning")
    assert capsys.readouterr().out == "first\na real warning\n"


def test_output_survives_an_exception(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(RuntimeError), drop_known_prints("noise"):
        print("what happened before the error")
        raise RuntimeError("boom")
    assert capsys.readouterr().out == "what happened before the error\n"
