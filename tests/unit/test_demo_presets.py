"""The demo's budgets: each scale's preset fills what the user left at 0 / empty, and nothing else."""

from __future__ import annotations

import pytest

from latentpipe.pipeline.demo import PRESET_PRIORS, PRIORS, SCALES, DemoConfig


def test_tiny_trains_the_diffusion_priors_and_medium_adds_ar() -> None:
    tiny = DemoConfig(workdir="w")
    assert tiny.priors == ["ddpm", "flow"] and tiny.prior_steps == SCALES["tiny"]["prior_steps"] == 2000
    assert DemoConfig(workdir="w", scale="medium").priors == list(PRIORS) == ["ddpm", "flow", "ar"]
    assert set(PRESET_PRIORS) == set(SCALES)


def test_explicit_values_win_over_the_preset() -> None:
    cfg = DemoConfig(workdir="w", priors=["flow", "ar"], prior_steps=7, ae_steps=3)
    assert cfg.priors == ["flow", "ar"] and cfg.prior_steps == 7 and cfg.ae_steps == 3
    assert cfg.scorer_steps == SCALES["tiny"]["scorer_steps"]


@pytest.mark.parametrize(("kwargs", "match"), [({"priors": ["gan"]}, "unknown prior 'gan'"),
                                               ({"prior_steps": -1}, "prior_steps must be >= 1")])
def test_bad_values_are_refused(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DemoConfig(workdir="w", **kwargs)  # type: ignore[arg-type]
