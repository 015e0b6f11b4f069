"""DDPM and rectified-flow objectives against closed-form cases.

The analytic models here are exact for Gaussian data x ~ N(mu, sigma^2) (per element):
the true eps / velocity is known in closed form, so losses have known minima. They are
also the oracles for tests/unit/test_samplers.py.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch

from latentpipe.training.guidance import TextCond
from latentpipe.training.objectives import LatentBatch
from latentpipe.training.objectives.ddpm import DDPMConfig, DDPMObjective, NoiseSchedule, make_betas
from latentpipe.training.objectives.flow import FlowConfig, FlowObjective, TimeShift, path_sample, shift_time
from latentpipe.training.samplers import DDIMSampler, EulerSampler


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny tensors: one intra-op thread is fastest, and fair on a shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------- analytic oracles


def cond_mean(cond: TextCond, mu_null: float, like: torch.Tensor) -> torch.Tensor:
    """Per-row data mean: text[:, 0, 0] for kept captions, mu_null for dropped -> [B, 1, ...]."""
    mu = torch.where(cond.drop, torch.full_like(cond.text[:, 0, 0], mu_null), cond.text[:, 0, 0])
    return mu.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


class GaussianDenoiser:
    """Exact DDPM model for x_0 ~ N(mu_c, sigma^2): E[eps | x_t] written in the schedule's parameterisation."""

    def __init__(self, schedule: NoiseSchedule, sigma: float, mu_null: float = 0.0) -> None:
        self.schedule, self.s2, self.mu_null = schedule, sigma**2, mu_null

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: TextCond) -> torch.Tensor:
        mu = cond_mean(cond, self.mu_null, x)
        a = self.schedule.abar(t, x)
        eps = (1 - a).sqrt() / (a * self.s2 + 1 - a) * (x - a.sqrt() * mu)
        return self.schedule.output_from_eps(eps, x, t)


class GaussianVelocity:
    """Exact flow model for X_1 ~ N(mu_c, sigma^2): E[X_1 - X_0 | X_t = x]."""

    def __init__(self, sigma: float, mu_null: float = 0.0) -> None:
        self.s2, self.mu_null = sigma**2, mu_null

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: TextCond) -> torch.Tensor:
        mu = cond_mean(cond, self.mu_null, x)
        tb = t.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
        d = tb**2 * self.s2 + (1 - tb) ** 2  # Var(X_t)
        r = x - tb * mu
        return mu + (tb * self.s2 - (1 - tb)) / d * r  # E[X_1 | x] - E[X_0 | x]


def mean_cond(n: int, mu: float) -> TextCond:
    return TextCond.of(torch.full((n, 1, 1), mu))


# ----------------------------------------------------------------- DDPM


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_forward_process_statistics(schedule: str) -> None:
    sched = NoiseSchedule(DDPMConfig(schedule=schedule))  # type: ignore[arg-type]
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((20000, 1, 2, 2), 1.7)
    for t_val in (1, 250, 500, 1000):
        t = torch.full((x0.shape[0],), t_val)
        eps = torch.randn(x0.shape, generator=g)
        xt = sched.q_sample(x0, t, eps)
        ab = float(sched.alpha_bar[t_val])
        assert xt.mean().item() == pytest.approx(math.sqrt(ab) * 1.7, abs=0.02)
        assert xt.var().item() == pytest.approx(1 - ab, rel=0.03, abs=1e-5)


def test_schedules() -> None:
    lin = make_betas(DDPMConfig(schedule="linear"))
    assert lin[0].item() == pytest.approx(1e-4) and lin[-1].item() == pytest.approx(0.02) and len(lin) == 1000
    sl = make_betas(DDPMConfig(schedule="scaled_linear", beta_start=0.00085, beta_end=0.012))
    assert sl[0].item() == pytest.approx(0.00085) and sl[-1].item() == pytest.approx(0.012)
    cfg = DDPMConfig(schedule="cosine")
    sched = NoiseSchedule(cfg)
    f = [math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2 for t in range(1001)]
    for t in (0, 1, 100, 500, 900):  # betas below the 0.999 clip: abar_t = f(t) / f(0)
        assert sched.alpha_bar[t].item() == pytest.approx(f[t] / f[0], rel=1e-9)
    for s in (NoiseSchedule(DDPMConfig()), sched):
        assert s.alpha_bar[0].item() == 1.0 and bool((s.alpha_bar[1:] < s.alpha_bar[:-1]).all())


def test_training_times_uniform_on_1_to_T() -> None:
    obj = DDPMObjective(DDPMConfig(timesteps=10))
    t = obj.sample_t(50000, torch.device("cpu"), torch.Generator().manual_seed(1))
    counts = torch.bincount(t, minlength=11)
    assert counts[0].item() == 0 and int(t.max()) == 10
    assert ((counts[1:].float() / 5000 - 1).abs() < 0.06).all()


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_parameterisation_round_trip(prediction: str) -> None:
    sched = NoiseSchedule(DDPMConfig(schedule="cosine", prediction=prediction))  # type: ignore[arg-type]
    g = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(64, 3, 4, 4, generator=g), torch.randn(64, 3, 4, 4, generator=g)
    t = torch.randint(1, 1001, (64,), generator=g)
    xt = sched.q_sample(x0.double(), t, eps.double())
    e, x = sched.to_eps_x0(sched.target(x0.double(), eps.double(), t), xt, t)
    torch.testing.assert_close(e, eps.double(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(x, x0.double(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(sched.output_from_eps(eps.double(), xt, t), sched.target(x0.double(), eps.double(), t))


def test_eps_loss_of_the_exact_model_is_the_posterior_variance() -> None:
    """E||eps - E[eps|x_t]||^2 = mean_t abar s^2 / (abar s^2 + 1 - abar) for N(mu, s^2) data."""
    sigma, mu = 0.5, 1.0
    obj = DDPMObjective(DDPMConfig())
    g = torch.Generator().manual_seed(3)
    x = mu + sigma * torch.randn(32768, 1, 2, 2, generator=g)
    loss, logs = obj.loss(GaussianDenoiser(obj.schedule, sigma), LatentBatch(x, mean_cond(32768, mu)), g)
    ab = obj.schedule.alpha_bar[1:]
    expected = (ab * sigma**2 / (ab * sigma**2 + 1 - ab)).mean().item()
    assert loss.item() == pytest.approx(expected, rel=0.03)
    assert logs["mse"] == pytest.approx(loss.item())


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_imagen_x0_loss_with_snr_weight_equals_the_eps_loss(schedule: str) -> None:
    """Imagen's E[w_t ||x0_hat - x0||^2] with w_t = SNR(t) is the eps loss, sample by sample."""
    sigma = 0.7
    x = 0.3 + sigma * torch.randn(512, 2, 4, 4, generator=torch.Generator().manual_seed(4))
    losses = []
    for pred in ("eps", "x0"):
        obj = DDPMObjective(DDPMConfig(schedule=schedule, prediction=pred))  # type: ignore[arg-type]
        model = GaussianDenoiser(obj.schedule, sigma * 1.3)  # a slightly wrong model: loss > 0
        loss, _ = obj.loss(model, LatentBatch(x, mean_cond(512, 0.0)), torch.Generator().manual_seed(5))
        losses.append(loss.item())
    assert losses[0] > 0.01
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)


def test_weights() -> None:
    t = torch.tensor([1, 100, 500, 900, 1000])
    cfg = DDPMConfig(schedule="cosine")
    snr = NoiseSchedule(cfg).snr(t)
    gamma = 5.0
    expect = {
        ("eps", None): torch.ones_like(snr),
        ("v", None): torch.ones_like(snr),
        ("x0", None): snr,
        ("eps", gamma): snr.clamp(max=gamma) / snr,
        ("v", gamma): snr.clamp(max=gamma) / (snr + 1),
        ("x0", gamma): snr.clamp(max=gamma),
    }
    for (pred, g), w in expect.items():
        obj = DDPMObjective(DDPMConfig(schedule="cosine", prediction=pred, min_snr_gamma=g))  # type: ignore[arg-type]
        torch.testing.assert_close(obj.weights(t), w.float())
    trunc = DDPMObjective(DDPMConfig(schedule="cosine", prediction="x0", x0_weighting="truncated_snr"))
    torch.testing.assert_close(trunc.weights(t), snr.clamp(min=1).float())
    # min-SNR in every parameterisation is the same loss: min(SNR, gamma) ||x0_hat - x0||^2
    x = torch.randn(256, 1, 4, 4, generator=torch.Generator().manual_seed(6))
    losses = []
    for pred in ("eps", "v", "x0"):
        obj = DDPMObjective(DDPMConfig(schedule="cosine", prediction=pred, min_snr_gamma=gamma))  # type: ignore[arg-type]
        model = GaussianDenoiser(obj.schedule, 2.0)
        losses.append(obj.loss(model, LatentBatch(x, mean_cond(256, 0.0)), torch.Generator().manual_seed(7))[0].item())
    assert losses[1] == pytest.approx(losses[0], rel=1e-4) and losses[2] == pytest.approx(losses[0], rel=1e-4)


# ----------------------------------------------------------------- flow


def test_flow_path_endpoints() -> None:
    g = torch.Generator().manual_seed(8)
    x1, x0 = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    at0, v = path_sample(x1, x0, torch.zeros(4))
    at1, _ = path_sample(x1, x0, torch.ones(4))
    torch.testing.assert_close(at0, x0)
    torch.testing.assert_close(at1, x1)
    torch.testing.assert_close(v, x1 - x0)
    mid, _ = path_sample(x1, x0, torch.tensor([0.0, 0.25, 0.5, 1.0]))
    torch.testing.assert_close(mid[1], 0.25 * x1[1] + 0.75 * x0[1])


def _normal_cdf(z: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1 + torch.erf(z / math.sqrt(2)))


def _ks(samples: torch.Tensor, cdf: torch.Tensor) -> float:
    """Kolmogorov-Smirnov statistic of sorted samples against the model CDF evaluated at them."""
    n = samples.numel()
    emp_hi = torch.arange(1, n + 1, dtype=torch.float64) / n
    return float(torch.maximum(emp_hi - cdf, cdf - (emp_hi - 1 / n)).abs().max())


@pytest.mark.parametrize(("m", "s", "a"), [(0.0, 1.0, 1.0), (0.5, 0.8, 1.0), (-0.3, 1.2, 3.0)])
def test_logit_normal_times_follow_the_density(m: float, s: float, a: float) -> None:
    """t = sigmoid(m + s n) has CDF Phi((logit t - m) / s); after the shift t' = g(t), CDF(g^-1(u))."""
    base_seq_len = 64 if a == 1.0 else 16
    shift = TimeShift(base=a / 2 if a != 1.0 else 1.0, base_seq_len=base_seq_len)  # factor at 8x8: a
    assert shift.factor(8, 8) == pytest.approx(a)
    obj = FlowObjective(FlowConfig(logit_mean=m, logit_std=s, time_shift=shift))
    n = 200_000
    t = obj.sample_t(n, 8, 8, torch.device("cpu"), torch.Generator().manual_seed(9)).double().sort().values
    assert float(t.min()) > 0 and float(t.max()) < 1
    u = a * t / (1 - t + a * t)  # g^-1: undo the shift
    cdf = _normal_cdf((torch.log(u / (1 - u)) - m) / s)
    assert _ks(t, cdf) < 1.95 / math.sqrt(n) * 1.5  # 0.1 % KS critical value, with margin
    # and the histogram against the density p(t') = p_LN(u) du/dt'
    hist = torch.histc(t, bins=40, min=0.0, max=1.0) / (n / 40)
    c = (torch.arange(40, dtype=torch.float64) + 0.5) / 40
    uc = a * c / (1 - c + a * c)
    p_ln = torch.exp(-((torch.log(uc / (1 - uc)) - m) ** 2) / (2 * s * s)) / (s * math.sqrt(2 * math.pi) * uc * (1 - uc))
    dens = p_ln * a / (1 - c + a * c) ** 2
    assert float((hist - dens).abs().max()) < 0.06 * float(dens.max())
    if a > 1:  # the shift moves mass towards noise (small t)
        assert float(t.median()) < 1 / (1 + math.exp(-m))


def test_uniform_times_and_shift_formula() -> None:
    obj = FlowObjective(FlowConfig(time_sampling="uniform"))
    t = obj.sample_t(100_000, 4, 4, torch.device("cpu"), torch.Generator().manual_seed(10)).double().sort().values
    assert _ks(t, t) < 0.01
    # SD3 eq. 23 on the noise level sigma = 1 - t: sigma' = a sigma / (1 + (a - 1) sigma)
    sig = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    torch.testing.assert_close(1 - shift_time(1 - sig, 3.0), 3 * sig / (1 + 2 * sig))
    ts = TimeShift(base=1.0, base_seq_len=256)
    assert ts.factor(32, 32) == pytest.approx(2.0) and ts.factor(16, 16) == pytest.approx(1.0)


@pytest.mark.parametrize("sampling", ["uniform", "logit_normal"])
def test_flow_loss_of_the_exact_model_is_the_conditional_variance(sampling: str) -> None:
    """E||X1 - X0 - v*(X_t)||^2 = E_t[s^2 / (t^2 s^2 + (1 - t)^2)] per element for N(mu, s^2) data."""
    sigma, mu = 0.6, -0.5
    obj = FlowObjective(FlowConfig(time_sampling=sampling))  # type: ignore[arg-type]
    g = torch.Generator().manual_seed(11)
    x = mu + sigma * torch.randn(8192, 1, 4, 4, generator=g)
    loss, _ = obj.loss(GaussianVelocity(sigma), LatentBatch(x, mean_cond(8192, mu)), g)
    tt = torch.linspace(1e-6, 1 - 1e-6, 200_001, dtype=torch.float64)
    f = sigma**2 / (tt**2 * sigma**2 + (1 - tt) ** 2)
    if sampling == "uniform":
        p = torch.ones_like(tt)
    else:
        p = torch.exp(-torch.log(tt / (1 - tt)) ** 2 / 2) / (math.sqrt(2 * math.pi) * tt * (1 - tt))
    expected = float(torch.trapezoid(f * p, tt) / torch.trapezoid(p, tt))
    assert loss.item() == pytest.approx(expected, rel=0.03)


# ----------------------------------------------------------------- a tiny model learns two modes


class TinyDenoiser(torch.nn.Module):
    """MLP over flattened [B, 2, 2, 2] latents, a time embedding and a +-1 class from TextCond."""

    def __init__(self, t_scale: float) -> None:
        super().__init__()
        self.t_scale = t_scale
        self.net = torch.nn.Sequential(
            torch.nn.Linear(8 + 8 + 2, 128), torch.nn.SiLU(), torch.nn.Linear(128, 128), torch.nn.SiLU(),
            torch.nn.Linear(128, 8),
        )

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: TextCond) -> torch.Tensor:
        freqs = torch.arange(1, 5, dtype=x.dtype) * math.pi
        tt = (t / self.t_scale)[:, None] * freqs  # [B, 4]
        label = torch.where(cond.drop, torch.zeros_like(cond.text[:, 0, 0]), cond.text[:, 0, 0])
        feats = torch.cat([x.flatten(1), tt.sin(), tt.cos(), label[:, None], cond.drop[:, None].to(x.dtype)], 1)
        return self.net(feats).view_as(x)  # [B, 8] -> [B, 2, 2, 2]


def _two_modes(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents at +-1.5 (all 8 dims) with small noise, and their labels +-1 [n]."""
    label = torch.randint(0, 2, (n,), generator=g).float() * 2 - 1
    x = 1.5 * label.view(-1, 1, 1, 1) * torch.ones(n, 2, 2, 2) + 0.1 * torch.randn(n, 2, 2, 2, generator=g)
    return x, label


@pytest.mark.parametrize("family", ["ddpm", "flow"])
def test_tiny_model_learns_two_modes(family: str) -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(12)
    if family == "ddpm":
        ddpm = DDPMObjective(DDPMConfig(timesteps=200, schedule="cosine", prediction="v"))
        objective: DDPMObjective | FlowObjective = ddpm
        model = TinyDenoiser(200.0)
        sampler: DDIMSampler | EulerSampler = DDIMSampler(ddpm.schedule)
    else:
        objective = FlowObjective(FlowConfig())
        model = TinyDenoiser(1.0)
        sampler = EulerSampler()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(400):
        x, label = _two_modes(256, g)
        cond = TextCond(label.view(-1, 1, 1), torch.ones(256, 1, dtype=torch.bool), torch.rand(256, generator=g) < 0.2)
        loss, _ = objective.loss(model, LatentBatch(x, cond), g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-50:]) < 0.5 * sum(losses[:50])
    label = torch.tensor([1.0, -1.0]).repeat(200)
    cond = TextCond.of(label.view(-1, 1, 1))
    noise = torch.randn(400, 2, 2, 2, generator=g)
    # conditional samples land near the requested mode
    xs = sampler.sample(model, noise, cond, 50, guidance=None, generator=g)
    dist = (xs.flatten(1) - 1.5 * label[:, None]).norm(dim=1) / math.sqrt(8)
    assert (dist < 0.4).float().mean() > 0.9
    # unconditional samples land near one of the two modes, both of them
    xu = sampler.sample(model, noise, cond.null(), 50, guidance=None, generator=g)
    d_pos = (xu.flatten(1) - 1.5).norm(dim=1) / math.sqrt(8)
    d_neg = (xu.flatten(1) + 1.5).norm(dim=1) / math.sqrt(8)
    assert (torch.minimum(d_pos, d_neg) < 0.4).float().mean() > 0.9
    assert 0.2 < (d_pos < d_neg).float().mean() < 0.8
