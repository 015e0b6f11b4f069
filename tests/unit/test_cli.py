"""The real console script, in a subprocess."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

EXE = shutil.which("latentpipe", path=str(Path(sys.executable).parent)) or "latentpipe"


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([EXE, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def test_help_lists_subcommands() -> None:
    r = cli("--help")
    assert r.returncode == 0
    assert "synth" in r.stdout
    r = cli("synth", "--help")
    assert r.returncode == 0 and "--out" in r.stdout


def test_synth_folder(tmp_path: Path) -> None:
    out = tmp_path / "scenes"
    r = cli("synth", "--n", "40", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert len(list(out.glob("*.png"))) == 40
    assert len(list(out.glob("*.txt"))) == 40
    attrs = json.loads((out / "00000003.json").read_text())
    assert {"objects", "background", "count"} <= set(attrs)
    assert (out / "synth_config.yaml").read_text().count("n: 40") == 1


def test_synth_parquet_with_config_file(tmp_path: Path) -> None:
    cfg = tmp_path / "synth.yaml"
    cfg.write_text("n: 12\nsize: 48\nformat: parquet\n")
    r = cli("synth", str(cfg), "seed=5", "--out", str(tmp_path / "p"))
    assert r.returncode == 0, r.stderr
    table = pq.read_table(tmp_path / "p" / "scenes.parquet")
    assert table.num_rows == 12
    assert set(table.column_names) == {"key", "image", "caption", "attributes"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["synth", "--out", "X", "bogus=1"], "unknown config key bogus"),
        (["synth", "--out", "X", "n=abc"], "n: expected an integer"),
        (["synth", "--n", "3"], "--out is required"),
        (["synth", "--out", "X", "--size", "8"], "size must be between 32 and 512"),
        (["synth", "--out", "X", "missing.yaml"], "config file not found"),
        (["synth", "--frobnicate"], "unrecognized arguments"),
        (["nosuchcommand"], "invalid choice"),
    ],
)
def test_bad_arguments_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    r = cli(*args, cwd=tmp_path)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert message in lines[0]
    assert "Traceback" not in r.stderr


def test_print_config(tmp_path: Path) -> None:
    r = cli("synth", "--out", "o", "--n", "7", "--print-config", cwd=tmp_path)
    assert r.returncode == 0
    assert "n: 7" in r.stdout
    assert not (tmp_path / "o").exists()


def test_overrides_after_flags_in_any_order(tmp_path: Path) -> None:
    """Dotted overrides may follow or sit among a subcommand's flags (intermixed parsing)."""
    cfg = Path(__file__).resolve().parents[2] / "configs/train_toy.yaml"
    r = cli("train", str(cfg), "--nproc", "2", "steps=17", "--print-config", "data.batch_size=3", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "steps: 17" in r.stdout and "batch_size: 3" in r.stdout
    r = cli("synth", "--out", "o", "n=5", "--print-config", "--size", "64", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "n: 5" in r.stdout and "size: 64" in r.stdout
    r = cli("train", str(cfg), "--nproc", "2", "steps=17", "--frobnicate", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "unrecognized arguments: --frobnicate" in r.stderr


def test_every_subcommand_parses_intermixed() -> None:
    """Every subcommand with ``key=value`` positionals takes them after a flag (in-process parser)."""
    from latentpipe.pipeline.cli import build_parser, parse_args

    parser = build_parser()
    with_items = [name for name, sub in parser._defaults["_subcommands"].items()
                  if any(a.dest == "items" for a in sub._actions)]
    assert {"synth", "shard", "encode", "train", "demo"} <= set(with_items)
    for name in with_items:
        args = parse_args(parser, [name, "a=1", "--print-config", "b.c=2"])
        assert args.command == name and args.items == ["a=1", "b.c=2"] and args.print_config


def test_verify_names_the_bad_file(tmp_path: Path) -> None:
    from tests.unit.test_train_checkpoint import _save_pt

    root = tmp_path / "run" / "checkpoints"
    for s in (1, 2):
        _save_pt(root, s)
    r = cli("verify", str(tmp_path / "run"))
    assert r.returncode == 0 and r.stdout.count("ok   ") == 2, r.stdout + r.stderr
    bad = root / "step-000002" / "model" / "states.pt"
    size = bad.stat().st_size
    bad.write_bytes(bad.read_bytes()[:100])
    r = cli("verify", str(tmp_path / "run"))
    assert r.returncode == 1 and r.stdout.splitlines() == [
        f"BAD  {root / 'step-000002'}: {bad}: 100 bytes, {size} when saved (truncated)",
        f"ok   {root / 'step-000001'}: 3 files"], r.stdout + r.stderr
    assert cli("verify", str(root / "step-000001")).returncode == 0
    assert cli("verify", str(root / "step-000002")).returncode == 1
    r = cli("verify", str(tmp_path / "nowhere"))
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [f"latentpipe verify: error: {tmp_path / 'nowhere'}: "
                                                                   "no such folder"]


def _no_cuda_here() -> str:
    """A CUDA device this machine does not have: any when torch sees none, else one past the last."""
    import torch

    return f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["eval", "--model", "no-such-model", "--steps", "0"], "--steps must be >= 1"),
        (["eval", "train-scorer", "--scorer", "sc", "--scorer-steps", "0"], "--scorer-steps must be >= 1"),
        (["eval", "train-scorer", "--scorer", "sc", "--scorer-samples", "-3"], "--scorer-samples must be >= 1"),
        (["sample", "--model", "no-such-model", "--prompt", "a red cube", "--cfg", "-5"], "--cfg must be >= 0"),
        (["sample", "--model", "no-such-model", "--prompt", "a red cube", "--steps", "0"], "--steps must be >= 1"),
        (["sample", "--model", "no-such-model", "--prompt", "a red cube", "--device", _no_cuda_here()], "--device cuda"),
        (["sample", "--model", "no-such-model", "--prompt", "a red cube", "--device", "gpu0"], "not a device"),
        (["demo", "prior_steps=-1"], "prior_steps must be >= 1"),
        (["demo", "--scale", "small", "nproc=-2"], "nproc must be >= 1"),
        (["encode", "--images", "empty", "--out", "latents", "--text-encoder", "minilm"], "no image shards"),
    ],
)
def test_bad_values_fail_before_any_work(tmp_path: Path, args: list[str], message: str) -> None:
    """Each is refused with one line naming the cause, and nothing was written (no model loaded,
    no scorer trained, no demo or dataset folder started)."""
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("not a shard")
    before = sorted(p.name for p in tmp_path.iterdir())
    r = cli(*args, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert message in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no sc/, demo-run/, latents/
