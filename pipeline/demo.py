"""The whole pipeline on embedded defaults: synthetic scenes -> shard -> KL-VAE (+ VQGAN) ->
encode -> diffusion and flow (+ autoregressive) priors -> eval -> sample grids. The AR prior and
its VQGAN run at ``--scale medium`` and ``small``, or with ``priors=[ddpm,flow,ar]``.

Every stage runs the real ``latentpipe`` command in a subprocess and leaves its real outputs
in the workdir; a stage whose outputs are complete is skipped on a rerun (``fresh`` redoes
everything). Models are registered in the MLflow store ``sqlite:///<workdir>/mlflow.db``
(or ``$MLFLOW_TRACKING_URI``).
"""

from __future__ import annotations

import importlib.resources
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger("latentpipe.demo")

PRIORS = ("ddpm", "flow", "ar")
EXPERIMENT = "latentpipe-demo"  # every demo run (shard, encode, training, eval) in one experiment of its own
PROMPTS = (
    "a large red circle on the left",
    "a small blue square at the top and a large yellow star at the bottom",
    "two small green triangles on the left and on the right",
    "a large white hexagon in the centre on a dark background",
)


@dataclass
class DemoConfig:
    """Sizes of every stage; ``scale`` picks a preset, explicit values override it."""

    workdir: str = "demo-run"
    scale: Literal["tiny", "medium", "small"] = "tiny"
    samples: int = 0  # 0: from the scale preset
    samples_per_shard: int = 0
    ae_steps: int = 0  # the KL-VAE's steps
    vq_steps: int = 0  # the VQGAN's steps (only the AR prior reads its tokens)
    ae_batch_size: int = 0  # per rank, both autoencoders
    prior_steps: int = 0  # the DDPM and flow priors' steps
    ar_steps: int = 0  # the AR prior's steps (its steps cost ~3x the DiT's on a CPU)
    batch_size: int = 0  # per rank, the priors
    scorer_steps: int = 0
    eval_n: int = 0
    priors: list[str] = field(default_factory=list)  # empty: the scale's (PRESET_PRIORS)
    nproc: int = 0  # ranks per training job; 0: the GPUs present, else 2 CPU ranks
    ray_address: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        bad = sorted(set(self.priors) - set(PRIORS))
        if bad:
            raise ValueError(f"unknown prior {bad[0]!r} (choose from {', '.join(PRIORS)})")
        for key in (*SCALES[self.scale], "nproc"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} must be >= 1, or 0 for the default; got {getattr(self, key)}")
        preset = SCALES[self.scale]
        for key, value in preset.items():
            if getattr(self, key) == 0:
                setattr(self, key, value)
        if not self.priors:
            self.priors = list(PRESET_PRIORS[self.scale])


# The AR prior's steps cost ~8x the DiT's on a CPU (4.6M parameters over 97 positions): at the tiny
# budget it stays at chance (120 steps: colour 0.13, chance 0.10), so tiny trains the DDPM and flow
# priors only (and no VQGAN); `priors=[ddpm,flow,ar]` adds it at any scale.
PRESET_PRIORS: dict[str, tuple[str, ...]] = {"tiny": ("ddpm", "flow"), "medium": PRIORS, "small": PRIORS}
SCALES: dict[str, dict[str, int]] = {
    # tiny: the diffusion priors on a 2-core CPU within 15 minutes, long enough to draw the stated
    # colour at the stated place (benchmarks/RESULTS.md, "Prior quality" and "Demo wall time").
    "tiny": {"samples": 2000, "samples_per_shard": 250, "ae_steps": 1000, "vq_steps": 300, "ae_batch_size": 16,
             "prior_steps": 2000, "ar_steps": 120, "batch_size": 32, "scorer_steps": 1500, "eval_n": 200},
    # medium: more data and steps for shapes and several objects, and the AR prior: about an hour of a
    # 2-core CPU, best caption accuracy 0.72 (benchmarks/RESULTS.md, "Prior quality", "Demo wall time").
    "medium": {"samples": 8000, "samples_per_shard": 1000, "ae_steps": 2000, "vq_steps": 1500, "ae_batch_size": 16,
               "prior_steps": 4000, "ar_steps": 1500, "batch_size": 32, "scorer_steps": 2000, "eval_n": 500},
    # small: the budget for a GPU machine or a long CPU job.
    "small": {"samples": 20000, "samples_per_shard": 1000, "ae_steps": 4000, "vq_steps": 4000, "ae_batch_size": 32,
              "prior_steps": 6000, "ar_steps": 6000, "batch_size": 64, "scorer_steps": 2000, "eval_n": 500},
}


def configs_dir() -> Path:
    """The YAML configs: ``$LATENTPIPE_CONFIGS``, else the configs shipped as ``latentpipe.configs``."""
    env = os.environ.get("LATENTPIPE_CONFIGS")
    path = Path(env) if env else Path(str(importlib.resources.files("latentpipe.configs")))
    if not (path / "ae_kl_demo.yaml").is_file():
        raise FileNotFoundError(f"demo configs not found in {path} (set LATENTPIPE_CONFIGS)")
    return path


class Demo:
    def __init__(self, cfg: DemoConfig, fresh: bool = False) -> None:
        self.cfg = cfg
        self.root = Path(cfg.workdir).resolve()
        if fresh and self.root.exists():
            shutil.rmtree(self.root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.tracking_uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{self.root / 'mlflow.db'}"
        self.env = dict(os.environ, MLFLOW_TRACKING_URI=self.tracking_uri, HF_HUB_OFFLINE="1")
        self.env.setdefault("DS_ACCELERATOR", "cpu" if not _gpus() else "cuda")
        self.configs = configs_dir()
        self.timings: dict[str, float] = {}
        self.made: dict[str, str] = {}
        self.metrics: dict[str, dict[str, float]] = {}

    # -- helpers -----------------------------------------------------------------------------

    def latentpipe(self, stage: str, *args: str) -> None:
        cmd = [sys.executable, "-m", "latentpipe.pipeline.cli", *args]
        log.info("[%s] %s", stage, " ".join(_short(a) for a in ["latentpipe", *args]))
        t0 = time.monotonic()
        r = subprocess.run(cmd, env=self.env)
        self.timings[stage] = self.timings.get(stage, 0.0) + time.monotonic() - t0
        if r.returncode != 0:
            raise RuntimeError(f"stage {stage} failed (exit {r.returncode}); rerun `latentpipe demo` to resume")

    def skip(self, stage: str, marker: Path) -> bool:
        if marker.exists():
            log.info("[%s] complete, skipped (%s)", stage, marker.relative_to(self.root))
            return True
        return False

    def train(self, stage: str, config: str, workdir: Path, batch_size: int, *overrides: str) -> Path:
        export = workdir / "export" / "export.json"
        if not self.skip(stage, export):
            nproc = self.cfg.nproc or max(_gpus(), 2)
            resume = ["--resume"] if _has_checkpoint(workdir) else []
            self.latentpipe(stage, "train", str(self.configs / config), f"workdir={workdir}",
                            f"tracking.uri={self.tracking_uri}", f"tracking.experiment={EXPERIMENT}",
                            f"tracking.register_as=latentpipe-demo-{stage}",
                            f"data.batch_size={batch_size}", f"seed={self.cfg.seed}", *overrides,
                            "--launcher", "torchrun", "--nproc", str(nproc), *resume)
        self.made[stage] = str(workdir / "export")
        return workdir / "export"

    # -- stages ------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        c, root = self.cfg, self.root
        data = root / "data"
        ray = ["--ray-address", c.ray_address] if c.ray_address else []
        if not self.skip("shard", data / "images" / "_manifest.json"):
            self.latentpipe("shard", "shard", "--source", f"synthetic:{c.samples}", "--out", str(data),
                            "--size", "32", "--format", "png", "--samples-per-shard", str(c.samples_per_shard),
                            f"source.synthetic_seed={c.seed}", "source.synthetic_size=32",
                            f"tracking.experiment={EXPERIMENT}", *ray)
        self.made["image shards"] = str(data / "images")
        images = str(data / "images")
        def ae(steps: int) -> list[str]:
            return [f"steps={steps}", f"checkpoint.every_steps={max(steps // 2, 1)}", f"sample_every={steps}",
                    f"data.shards={images}"]

        kl = self.train("kl-vae", "ae_kl_demo.yaml", root / "runs" / "kl-vae", c.ae_batch_size, *ae(c.ae_steps))
        vq = None
        if "ar" in c.priors:
            vq = self.train("vqgan", "ae_vq_demo.yaml", root / "runs" / "vqgan", c.ae_batch_size, *ae(c.vq_steps))
        latents = self.encode(data, kl, vq, ray)
        for kind in c.priors:
            steps = c.ar_steps if kind == "ar" else c.prior_steps
            refs = [f"model.vqgan={vq}"] if kind == "ar" else [f"model.vae={kl}"]
            self.train(kind, f"prior_{kind}_demo.yaml", root / "runs" / kind, c.batch_size, f"steps={steps}",
                       f"checkpoint.every_steps={max(steps // 2, 1)}", f"sample_every={steps}",
                       f"data.shards={latents}", *refs)
        self.evaluate()
        self.samples()
        return self.summary()

    def encode(self, data: Path, kl: Path, vq: Path | None, ray: list[str]) -> Path:
        found = sorted((data / "latents").glob("*/_manifest.json")) if (data / "latents").exists() else []
        complete = [m.parent for m in found if json.loads(m.read_text()).get("complete")]
        args = ["encode", "--images", str(data / "images"), "--out", str(data), "--vae", str(kl),
                "--text-encoder", "minilm", "--text-max-length", "32", f"tracking.experiment={EXPERIMENT}", *ray]
        if vq is not None:
            args += ["--vqgan", str(vq)]
        if len(complete) == 1 and self.skip("encode", complete[0] / "_manifest.json"):
            latents = complete[0]
        else:
            self.latentpipe("encode", *args)
            found = sorted((data / "latents").glob("*/_manifest.json"), key=lambda p: p.stat().st_mtime)
            latents = found[-1].parent
        self.made["latent shards"] = str(latents)
        return latents

    def evaluate(self) -> None:
        scorer = self.root / "scorer"
        if not self.skip("scorer", scorer / "scorer.safetensors"):
            self.latentpipe("scorer", "eval", "train-scorer", "--scorer", str(scorer),
                            "--scorer-steps", str(self.cfg.scorer_steps))
        self.made["scorer"] = str(scorer)
        # The judge's own score on held-out real scenes: what the priors' figures are capped by.
        self.metrics["real images"] = json.loads((scorer / "scorer_eval.json").read_text())
        for kind in self.cfg.priors:
            out = self.root / "eval" / kind
            if not self.skip(f"eval-{kind}", out / "metrics.json"):
                self.latentpipe(f"eval-{kind}", "eval", "--model", f"models:/latentpipe-demo-{kind}@final",
                                "--scorer", str(scorer), "--n", str(self.cfg.eval_n), "--out", str(out),
                                "--experiment", EXPERIMENT)
            self.metrics[kind] = json.loads((out / "metrics.json").read_text())

    def samples(self) -> None:
        for kind in self.cfg.priors:
            out = self.root / "samples" / f"{kind}.png"
            if not self.skip(f"sample-{kind}", out):
                prompts = [a for p in PROMPTS for a in ("--prompt", p)]
                self.latentpipe(f"sample-{kind}", "sample", "--model", f"models:/latentpipe-demo-{kind}@final",
                                *prompts, "--n", "4", "--out", str(out))
            self.made[f"{kind} samples"] = str(out)

    def summary(self) -> dict[str, Any]:
        result = {"workdir": str(self.root), "config": asdict(self.cfg), "made": self.made, "metrics": self.metrics,
                  "tracking_uri": self.tracking_uri, "seconds": self.timings}
        (self.root / "demo_summary.json").write_text(json.dumps(result, indent=2))
        return result


def format_summary(result: dict[str, Any]) -> str:
    lines = ["", f"latentpipe demo: done in {result['workdir']}", ""]
    width = max(len(k) for k in result["made"])
    lines += [f"  {k:<{width}}  {v}" for k, v in result["made"].items()]
    if result["metrics"]:
        lines += ["", "  held-out prompts   caption acc  presence  shape  colour  size  | one object: colour  presence"
                      "  | Frechet (real halves)"]
        for kind, m in result["metrics"].items():
            one = (f"{m['colour_1obj']:>18.2f}  {m['presence_1obj']:>8.2f}" if "colour_1obj" in m
                   else f"{'':>18}  {'':>8}")
            fd = f"{m['frechet']:>7.2f} ({m['frechet_real_halves']:.2f})" if "frechet" in m else "(the scorer's ceiling)"
            lines.append(f"  {kind:<17}  {m['caption_accuracy']:>11.3f}  {m['presence']:>8.2f}  {m['shape']:>5.2f}  "
                         f"{m['colour']:>6.2f}  {m['size']:>4.2f}  | {one}  | {fd}")
    uri = result["tracking_uri"]
    lines += ["", "Open the MLflow UI (runs, metrics, sample grids, registered models):"]
    if uri.startswith("sqlite:"):
        lines.append(f"  mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000")
    else:
        lines.append(f"  {uri}")
    lines.append("Sample more: latentpipe sample --model models:/latentpipe-demo-flow@final "
                 "--prompt 'a large red circle on the left' --out grid.png")
    return "\n".join(lines)


def _gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:
        return 0


def _has_checkpoint(workdir: Path) -> bool:
    from latentpipe.training.checkpoint import latest_complete

    root = workdir / "checkpoints"
    return root.is_dir() and latest_complete(root) is not None


def _short(arg: str) -> str:
    return arg if len(arg) < 80 else arg[:77] + "..."
