from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from latentpipe.preprocessing.config import (
    ConfigError,
    config_hash,
    from_dict,
    load_config,
    parse_override,
    to_dict,
)


@dataclass
class Optim:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass
class Cfg:
    name: str = "x"
    steps: int = 10
    precision: Literal["fp32", "bf16"] = "fp32"
    resume: bool = False
    out: Path | None = None
    tags: list[str] = field(default_factory=list)
    optim: Optim = field(default_factory=Optim)


def test_defaults_yaml_and_overrides(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("steps: 20\noptim:\n  lr: 0.01\n")
    cfg = load_config(Cfg, f, ["optim.lr=1e-4", "precision=bf16", "tags=[a, b]", "out=/tmp/o", "resume=true"])
    assert cfg.steps == 20
    assert cfg.optim.lr == pytest.approx(1e-4)
    assert cfg.optim.betas == (0.9, 0.999)
    assert cfg.precision == "bf16"
    assert cfg.tags == ["a", "b"]
    assert cfg.out == Path("/tmp/o")
    assert cfg.resume is True


def test_int_widens_to_float() -> None:
    assert from_dict(Cfg, {"optim": {"lr": 1}}).optim.lr == 1.0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["stepz=3"], "unknown config key stepz"),
        (["optim.momentum=0.9"], "unknown config key optim.momentum"),
        (["steps=ten"], "steps: expected an integer"),
        (["steps=1.5"], "steps: expected an integer"),
        (["resume=maybe"], "resume: expected true/false"),
        (["precision=fp8"], "precision: expected one of"),
        (["optim.betas=[0.9]"], "optim.betas: expected 2 items"),
        (["optim=3"], "optim: expected a mapping"),
        (["tags=[1, 2]"], "tags[0]: expected a string"),
        (["noequals"], "expected dotted.key=value"),
    ],
)
def test_errors_name_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(Cfg, None, overrides)


def test_bad_yaml_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(Cfg, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Cfg, bad)
    top = tmp_path / "list.yaml"
    top.write_text("- 1\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(Cfg, top)


def test_round_trip_and_hash() -> None:
    cfg = load_config(Cfg, None, ["steps=3", "out=/x"])
    again = from_dict(Cfg, to_dict(cfg))
    assert again == cfg
    assert config_hash(cfg) == config_hash(again)
    assert config_hash(cfg) != config_hash(load_config(Cfg, None, ["steps=4", "out=/x"]))


def test_parse_override_values() -> None:
    assert parse_override("a.b=1e-4") == ("a.b", 1e-4)
    assert parse_override("a=hello world") == ("a", "hello world")
    assert parse_override("a=") == ("a", "")
    assert parse_override("a=null") == ("a", None)
