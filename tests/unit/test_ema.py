"""ShardedEMA on real DeepSpeed engines (1 rank, gloo, in this process) for ZeRO 0, 2 and 3:
the EMA equals a hand-computed EMA of the fp32 weights, survives a save/load round trip, and
consolidates to the full parameters. (The 2-rank sharded cases run in the integration tests.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from latentpipe.training.config import TrainConfig
from latentpipe.training.ema import ShardedEMA
from latentpipe.training.families import family_from_config
from latentpipe.training.zero import build_engines, build_modules, setup_distributed


def _full_weights(engine: object) -> dict[str, torch.Tensor]:
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for name, p in engine.module.named_parameters():  # type: ignore[attr-defined]
        full = safe_get_full_fp32_param(p)
        out[name] = (p.data if full is None else full).detach().float().clone()
    return out


@pytest.mark.parametrize("stage,mode,warmup", [(0, "replicated", 0.0), (2, "hp", 0.0), (3, "zero3", 0.0),
                                               (2, "hp", 0.75)])
def test_ema_matches_hand_reference(stage: int, mode: str, warmup: float, tmp_path: Path) -> None:
    cfg = TrainConfig(model={"kind": "toy", "channels": 4, "hidden": 8})
    cfg.deepspeed.zero_stage = stage
    cfg.data.batch_size = 4
    cfg.optim.lr = 1e-2
    info = setup_distributed("gloo")
    family = family_from_config(cfg.model)
    engines = build_engines(build_modules(family, cfg, info.world_size), cfg, info.world_size)
    engine = engines["model"]
    decay = 0.75
    ema = ShardedEMA(engine, decay, warmup_power=warmup)
    assert ema.mode == mode

    gen = torch.Generator().manual_seed(0)

    def step() -> None:
        batch = {"image": torch.rand(4, 3, 16, 16, generator=gen) * 2 - 1}
        loss, _ = family.loss("model", engines, batch, 0)
        engine.backward(loss)
        engine.step()

    step()
    ema.start()
    ref = _full_weights(engine)
    for n in range(4):
        step()
        ema.update()
        w = _full_weights(engine)
        d = min(decay, 1 - (1 + n) ** -warmup) if warmup else decay
        ref = {k: d * ref[k] + (1 - d) * w[k] for k in ref}
        # The EMA lags the weights (with the warm-up, its first update copies them).
        assert all(torch.equal(ref[k], w[k]) for k in ref) == (d == 0.0)

    full = ema.full_state()
    assert sorted(full) == sorted(ref)
    for k in ref:
        torch.testing.assert_close(full[k], ref[k], rtol=1e-6, atol=1e-7)

    ema.save(tmp_path / "ema")
    again = ShardedEMA(engine, decay)
    again.load(tmp_path / "ema")
    for k in ref:
        torch.testing.assert_close(again.full_state()[k], full[k], rtol=0, atol=0)


def test_ema_warmup_schedule_values() -> None:
    """The warm-up decay 1 - (1 + n) ** -p, capped at ``decay``; none without a power."""
    ema = ShardedEMA.__new__(ShardedEMA)
    ema.decay, ema.warmup_power = 0.999, 0.75
    assert ema.decay_at(0) == 0.0  # the first update copies the weights
    assert ema.decay_at(1) == pytest.approx(1 - 2 ** -0.75)  # 0.405
    assert ema.decay_at(99) == pytest.approx(1 - 100 ** -0.75)  # 0.968: ~25 steps averaged at step 100
    assert ema.decay_at(10_000) == 0.999  # capped
    assert all(ema.decay_at(n) <= ema.decay_at(n + 1) for n in range(2000))
    ema.warmup_power = 0.0
    assert ema.decay_at(0) == ema.decay_at(5000) == 0.999


def test_ema_load_rejects_incomplete_or_foreign_shards(tmp_path: Path) -> None:
    cfg = TrainConfig(model={"kind": "toy", "channels": 4, "hidden": 8})
    cfg.deepspeed.zero_stage = 2
    info = setup_distributed("gloo")
    family = family_from_config(cfg.model)
    engine = build_engines(build_modules(family, cfg, info.world_size), cfg, info.world_size)["model"]
    ema = ShardedEMA(engine, 0.9)
    with pytest.raises(FileNotFoundError):
        ema.load(tmp_path / "nothing")
    name, (_, numel, full, _) = next(iter(ema.meta.items()))
    # Shards of another model (a parameter with other shapes), then shards missing a piece.
    (tmp_path / "a").mkdir()
    save_file({name: torch.zeros(full + 1)}, str(tmp_path / "a" / "rank-00000.safetensors"),
              metadata={"fragments": json.dumps({name: [0, full + 1, full + 1]})})
    with pytest.raises(ValueError, match="elements"):
        ema.load(tmp_path / "a")
    ema.start()
    ema.save(tmp_path / "b")
    half = {name: ema.shadow[name][: numel // 2].contiguous()}
    save_file(half, str(tmp_path / "b" / "rank-00000.safetensors"),
              metadata={"fragments": json.dumps({name: [0, numel // 2, full]})})
    with pytest.raises(ValueError, match="does not cover"):
        ShardedEMA(engine, 0.9).load(tmp_path / "b")
