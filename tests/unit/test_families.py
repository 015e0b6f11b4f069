"""Family registry, config parsing with ``model.`` key names, the toy families, and export round trips."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from latentpipe.preprocessing.config import ConfigError, load_config
from latentpipe.training.config import TrainConfig
from latentpipe.training.export import load_export, read_export_meta, save_export
from latentpipe.training.families import (
    FAMILIES,
    Family,
    family_from_config,
    get_family,
    model_config_dict,
    register,
)


def test_registry_and_config_errors() -> None:
    assert get_family("toy").name == "toy" and "toy_gan" in FAMILIES
    with pytest.raises(ConfigError, match="unknown family 'nope'"):
        get_family("nope")
    with pytest.raises(ConfigError, match="model.bogus"):
        family_from_config({"kind": "toy", "bogus": 1})
    with pytest.raises(ConfigError, match="model.hidden"):
        family_from_config({"kind": "toy", "hidden": "wide"})
    with pytest.raises(ConfigError, match="model.kind"):
        family_from_config({"hidden": 3})
    fam = family_from_config({"kind": "toy", "hidden": 12})
    assert model_config_dict(fam)["hidden"] == 12 and model_config_dict(fam)["kind"] == "toy"


def test_register_rejects_a_taken_name() -> None:
    @dataclass
    class Cfg:
        x: int = 1

    class Other(Family):
        name = "toy"
        data_kind = "images"
        config_class = Cfg

        def build(self) -> dict[str, nn.Module]:
            return {"model": nn.Linear(1, 1)}

        def loss(self, part, modules, batch, step):  # type: ignore[no-untyped-def]
            return torch.zeros(()), {}

    with pytest.raises(ValueError, match="already registered"):
        register(Other)


def test_train_config_names_bad_keys(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="deepspeed: zero_stage must be 0, 1, 2 or 3"):
        load_config(TrainConfig, None, ["deepspeed.zero_stage=5"])
    with pytest.raises(ConfigError, match="unknown config key ema.decy"):
        load_config(TrainConfig, None, ["ema.decy=0.9"])
    with pytest.raises(ConfigError, match="offload_optimizer"):
        load_config(TrainConfig, None, ["deepspeed.offload_optimizer=true", "deepspeed.zero_stage=0"])
    cfg = load_config(TrainConfig, Path(__file__).parents[2] / "configs/train_toy.yaml", ["model.hidden=32"])
    assert cfg.model == {"kind": "toy", "channels": 16, "hidden": 32} and cfg.deepspeed.zero_stage == 2


@pytest.mark.parametrize("kind", ["toy", "toy_gan"])
def test_export_round_trip_same_outputs(kind: str, tmp_path: Path) -> None:
    fam = family_from_config({"kind": kind, "hidden": 16})
    torch.manual_seed(0)
    module = fam.build()["model"].eval()
    save_export(tmp_path / "exp", fam.name, model_config_dict(fam), module.state_dict(), {"step": 7})
    meta = read_export_meta(tmp_path / "exp")
    assert meta["family"] == kind and meta["extra"] == {"step": 7} and meta["model_config"]["hidden"] == 16
    fam2, loaded = load_export(tmp_path / "exp")
    x = torch.rand(5, 3, 32, 32) * 2 - 1
    assert type(fam2) is type(fam) and torch.equal(loaded(x), module(x))
    # Re-exporting replaces the folder atomically; a wrong schema is refused.
    save_export(tmp_path / "exp", fam.name, model_config_dict(fam), module.state_dict(), {"step": 8})
    assert read_export_meta(tmp_path / "exp")["extra"]["step"] == 8
    meta["schema_version"] = 99
    (tmp_path / "exp" / "export.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="schema_version"):
        load_export(tmp_path / "exp")


def test_export_refuses_mismatched_weights(tmp_path: Path) -> None:
    small = family_from_config({"kind": "toy", "hidden": 8})
    big = family_from_config({"kind": "toy", "hidden": 16})
    save_export(tmp_path / "e", "toy", model_config_dict(big), small.build()["model"].state_dict())
    with pytest.raises((ConfigError, RuntimeError)):
        load_export(tmp_path / "e")


def test_toy_gan_keeps_critic_grads_out_of_generator_loss() -> None:
    fam = family_from_config({"kind": "toy_gan"})
    mods = fam.build()
    batch = {"image": torch.rand(4, 3, 32, 32) * 2 - 1}
    loss, logs = fam.loss("model", mods, batch, 0)
    loss.backward()
    assert all(p.grad is None for p in mods["disc"].parameters())
    assert all(p.grad is not None for p in mods["model"].parameters())
    assert all(p.requires_grad for p in mods["disc"].parameters())
    dloss, _ = fam.loss("disc", mods, batch, 0)
    for p in mods["model"].parameters():
        p.grad = None
    dloss.backward()
    assert all(p.grad is None for p in mods["model"].parameters())
    assert {"mse", "adv"} <= set(logs) and fam.parts(0) == ["model", "disc"]
    assert set(fam.log_images(mods, batch)) == {"colours"}


def test_train_command_rejects_bad_config_before_launching(capsys: pytest.CaptureFixture[str]) -> None:
    from latentpipe.pipeline.cli import main

    toy = str(Path(__file__).parents[2] / "configs/train_toy.yaml")
    assert main(["train", toy]) == 2
    assert "data.shards is required" in capsys.readouterr().err
    assert main(["train", toy, "data.shards=/nowhere", "model.foo=1"]) == 2
    assert "model.foo" in capsys.readouterr().err
    assert main(["train", toy, "data.shards=/nowhere", "data.kind=latents"]) == 2
    assert "trains on images" in capsys.readouterr().err
    assert main(["train", toy, "data.shards=/nowhere", "--nproc", "2"]) == 2
    assert "local launcher runs one rank" in capsys.readouterr().err


def test_latent_priors_take_their_factors_from_the_manifest(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    fam = family_from_config({"kind": "ddpm", "text_dim": 8})
    fam.bind_data({"scaling_factor": 0.5, "shift_factor": 0.1})
    assert (fam.cfg.scaling_factor, fam.cfg.shift_factor) == (0.5, 0.1)
    assert model_config_dict(fam)["scaling_factor"] == 0.5  # what the export records
    fam = family_from_config({"kind": "flow", "scaling_factor": 0.5})
    fam.bind_data({"scaling_factor": 0.5, "shift_factor": None})  # agrees; the VAE has no shift
    assert (fam.cfg.scaling_factor, fam.cfg.shift_factor) == (0.5, 0.0)
    fam = family_from_config({"kind": "ddpm"})
    fam.bind_data(None)  # no manifest (a glob of tars): the identity
    assert (fam.cfg.scaling_factor, fam.cfg.shift_factor) == (1.0, 0.0)
    with pytest.raises(ConfigError, match=r"^model.shift_factor=0.2 disagrees with the latent manifest's "
                                          r"shift_factor 0.1: drop the override"):
        family_from_config({"kind": "ddpm", "shift_factor": 0.2}).bind_data({"shift_factor": 0.1})
    # The train command refuses it before launching anything (fixture manifest: 0.18215).
    from latentpipe.pipeline.cli import main
    from tests.shards import make_latent_shards

    shards = make_latent_shards(tmp_path, 1, 4)
    cfg = str(Path(__file__).parents[2] / "configs/prior_ddpm_demo.yaml")
    assert main(["train", cfg, f"data.shards={shards}", "model.scaling_factor=1.0", f"workdir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["latentpipe train: error: model.scaling_factor=1.0 disagrees with the latent manifest's "
                   "scaling_factor 0.18215: drop the override (it defaults to the manifest's)"]
