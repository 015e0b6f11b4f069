"""Every sampler against closed-form Gaussian cases, plus CFG, seeding and batching contracts.

With the exact model for x ~ N(mu, sigma^2) data (tests/unit/test_objectives.py), a correct
sampler returns samples with mean mu and variance sigma^2 up to discretisation error; with
guidance w the exact guided model is the exact model of N(mu_u + w (mu_c - mu_u), sigma^2).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from latentpipe.training.guidance import TextCond
from latentpipe.training.objectives import Model
from latentpipe.training.objectives.ddpm import DDPMConfig, NoiseSchedule
from latentpipe.training.objectives.flow import TimeShift, shift_time
from latentpipe.training.samplers import (
    DDIMSampler,
    DDPMSampler,
    EulerSampler,
    HeunSampler,
    Sampler,
    ddpm_timesteps,
    flow_timesteps,
)
from tests.unit.test_objectives import GaussianDenoiser, GaussianVelocity

SIGMA, MU, MU_NULL = 0.5, 1.5, -0.5


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# (name, sampler, exact model, steps, tolerance on the mean; twice that on the relative variance)
def _cases() -> list[tuple[str, Sampler, Model, int, float]]:
    cases: list[tuple[str, Sampler, Model, int, float]] = []
    for schedule, pred in (("linear", "eps"), ("cosine", "v"), ("linear", "x0")):
        s = NoiseSchedule(DDPMConfig(schedule=schedule, prediction=pred))  # type: ignore[arg-type]
        m = GaussianDenoiser(s, SIGMA, MU_NULL)
        cases += [
            (f"ddpm-1000-{schedule}-{pred}", DDPMSampler(s), m, 1000, 0.03),
            (f"ddpm-100-beta-{schedule}-{pred}", DDPMSampler(s, variance="beta"), m, 100, 0.05),
            (f"ddim-250-{schedule}-{pred}", DDIMSampler(s), m, 250, 0.03),
            (f"ddim-200-eta1-{schedule}-{pred}", DDIMSampler(s, eta=1.0), m, 200, 0.05),
        ]
    v = GaussianVelocity(SIGMA, MU_NULL)
    cases += [
        ("euler-200", EulerSampler(), v, 200, 0.03),
        ("euler-200-shift3", EulerSampler(TimeShift(base=3.0)), v, 200, 0.03),
        ("heun-20", HeunSampler(), v, 20, 0.03),
        ("heun-20-shift3", HeunSampler(TimeShift(base=3.0)), v, 20, 0.03),
    ]
    return cases


CASES = _cases()
IDS = [c[0] for c in CASES]


def _cond(n: int, mu: float = MU) -> TextCond:
    return TextCond.of(torch.full((n, 1, 1), mu))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_recovers_gaussian_data(case: tuple[str, Sampler, Model, int, float]) -> None:
    _, sampler, model, steps, tol = case
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(4000, 2, 2, 2, generator=g)
    x = sampler.sample(model, noise, _cond(4000), steps, guidance=None, generator=g)
    assert x.shape == noise.shape and bool(torch.isfinite(x).all())
    assert x.mean().item() == pytest.approx(MU, abs=tol)
    assert x.var().item() == pytest.approx(SIGMA**2, rel=2 * tol)


@pytest.mark.parametrize("case", CASES[1::2], ids=IDS[1::2])
def test_classifier_free_guidance(case: tuple[str, Sampler, Model, int, float]) -> None:
    """w = 1 is the conditional model, w = 0 the unconditional; w = 3 is the exact model of mean mu_w."""
    _, sampler, model, steps, _ = case
    steps = min(steps, 50)
    noise = torch.randn(2000, 2, 2, 2, generator=torch.Generator().manual_seed(1))
    cond = _cond(2000)

    def run(c: TextCond, w: float | None) -> torch.Tensor:
        return sampler.sample(model, noise, c, steps, guidance=w, generator=torch.Generator().manual_seed(2))

    plain = run(cond, None)
    torch.testing.assert_close(run(cond, 1.0), plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(run(cond, 0.0), run(cond.null(), None), atol=1e-5, rtol=1e-5)
    # both exact models are affine in the data mean, so guidance extrapolates it exactly
    mu_w = MU_NULL + 3.0 * (MU - MU_NULL)
    torch.testing.assert_close(run(cond, 3.0), run(_cond(2000, mu_w), None), atol=1e-4, rtol=1e-4)


def _exact_ode_map(name: str, noise: torch.Tensor) -> torch.Tensor:
    """Where the exact probability-flow ODE takes each noise vector (an affine map for Gaussians)."""
    if name.startswith(("euler", "heun")):
        return MU + SIGMA * noise
    ab = float(NoiseSchedule(DDPMConfig(schedule=name.split("-")[2])).alpha_bar[-1])  # type: ignore[arg-type]
    return MU + SIGMA * (noise - ab**0.5 * MU) / (ab * SIGMA**2 + 1 - ab) ** 0.5


@pytest.mark.parametrize("case", [c for c in CASES if c[0].startswith(("ddim-250", "euler", "heun"))],
                         ids=[i for i in IDS if i.startswith(("ddim-250", "euler", "heun"))])
def test_deterministic_samplers_converge_at_their_order(case: tuple[str, Sampler, Model, int, float]) -> None:
    """Pointwise error to the exact ODE map halves (DDIM, Euler) or quarters (Heun) as steps double."""
    name, sampler, model, _, _ = case
    noise = torch.randn(500, 2, 2, 2, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    exact = _exact_ode_map(name, noise)
    errs = [float((sampler.sample(model, noise, _cond(500), n) - exact).abs().max()) for n in (20, 40, 80)]
    lo, hi = (3.0, 7.0) if name.startswith("heun") else (1.7, 2.3)
    assert lo < errs[0] / errs[1] < hi and lo < errs[1] / errs[2] < hi, errs


def test_guidance_runs_one_batched_pass_per_evaluation() -> None:
    calls: list[int] = []
    s = NoiseSchedule(DDPMConfig())
    exact = GaussianDenoiser(s, SIGMA, MU_NULL)

    def model(x: torch.Tensor, t: torch.Tensor, cond: TextCond) -> torch.Tensor:
        calls.append(x.shape[0])
        assert bool(cond.drop[:3].logical_not().all()) and bool(cond.drop[3:].all())
        return exact(x, t, cond)

    DDIMSampler(s).sample(model, torch.randn(3, 1, 2, 2), _cond(3), 7, guidance=2.0)
    assert calls == [6] * 7


@pytest.mark.parametrize("case", CASES[::2] + CASES[-4:], ids=IDS[::2] + IDS[-4:])
def test_seeded_and_batched(case: tuple[str, Sampler, Model, int, float]) -> None:
    """Same seed, same samples; a stochastic sampler differs across seeds; rows follow their own cond."""
    _, sampler, model, steps, _ = case
    steps = min(steps, 20)
    noise = torch.randn(6, 2, 4, 4, generator=torch.Generator().manual_seed(3))
    cond = TextCond.of(torch.tensor([1.0, -1.0, 2.0, 0.0, 1.0, -1.0]).view(6, 1, 1))
    a = sampler.sample(model, noise, cond, steps, 2.0, torch.Generator().manual_seed(4))
    b = sampler.sample(model, noise, cond, steps, 2.0, torch.Generator().manual_seed(4))
    c = sampler.sample(model, noise, cond, steps, 2.0, torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    stochastic = isinstance(sampler, DDPMSampler) or (isinstance(sampler, DDIMSampler) and sampler.eta > 0)
    assert torch.equal(a, c) != stochastic
    if not stochastic:  # one row alone gives the same sample as inside the batch
        one = sampler.sample(model, noise[2:3], _row(cond, 2), steps, 2.0)
        torch.testing.assert_close(one[0], a[2], atol=1e-5, rtol=1e-5)


def _row(cond: TextCond, i: int) -> TextCond:
    return TextCond(cond.text[i : i + 1], cond.mask[i : i + 1], cond.drop[i : i + 1])


def test_ddpm_with_all_steps_is_algorithm_2() -> None:
    """A literal transcription of Ho et al. Algorithm 2 (sigma_t^2 = beta_t) gives the same samples."""
    s = NoiseSchedule(DDPMConfig(timesteps=100, schedule="linear", beta_end=0.2))
    model = GaussianDenoiser(s, SIGMA, MU_NULL)
    cond = _cond(64)
    noise = torch.randn(64, 1, 2, 2, generator=torch.Generator().manual_seed(6))
    ours = DDPMSampler(s, variance="beta").sample(model, noise, cond, 100, None, torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    x = noise.double()
    alphas, abar = 1 - s.betas, s.alpha_bar
    for t in range(100, 0, -1):
        z = torch.randn(x.shape, generator=g, dtype=torch.float32).double() if t > 1 else torch.zeros_like(x)
        eps = model(x, torch.full((64,), float(t), dtype=torch.float64), cond)
        x = 1 / alphas[t].sqrt() * (x - (1 - alphas[t]) / (1 - abar[t]).sqrt() * eps) + s.betas[t].sqrt() * z
    torch.testing.assert_close(ours.double(), x, atol=1e-4, rtol=1e-4)


def test_time_grids() -> None:
    assert ddpm_timesteps(1000, 1000) == list(range(1000, -1, -1))
    for steps in range(1, 21):
        ts = ddpm_timesteps(20, steps)
        assert ts[0] == 20 and ts[-1] == 0 and len(ts) == steps + 1
        assert all(a > b for a, b in zip(ts, ts[1:]))
    with pytest.raises(ValueError, match="steps"):
        ddpm_timesteps(10, 11)
    shift = TimeShift(base=1.0, base_seq_len=16)  # factor 2 at 8x8
    grid = flow_timesteps(8, shift, 8, 8)
    expect = shift_time(torch.linspace(0, 1, 9, dtype=torch.float64), 2.0)
    assert grid == pytest.approx(expect.tolist()) and grid[0] == 0.0 and grid[-1] == 1.0
