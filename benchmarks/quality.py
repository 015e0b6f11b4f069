"""Quality vs sampling cost for every prior trained by the demo, in one run.

The priors are trained by ``latentpipe demo --scale SCALE --workdir DIR`` (the real stages: its
preset is the stated training budget), run first unless DIR already holds a finished demo. For
each trained prior (``DIR/runs/{ddpm,flow,ar}/export``) and each sampler setting below, ``latentpipe.training.evaluation.
evaluate_prior`` samples the same ``--n`` held-out built-in captions (same seed) and the demo's
scene scorer (``DIR/scorer``) reads them back:

- DDPM prior: ancestral DDPM with all 1000 steps, DDIM 50 and DDIM 20 (the model's CFG scale);
- flow prior: Euler 50 / 20 / 10 and Heun 10 (Heun costs two model calls per step but the last);
- AR prior: with the model's guidance scale, and without guidance (scale 1: conditional only).

Reported per setting: caption accuracy (every attribute of the prompt recovered), per-attribute
accuracy, the Fréchet distance to real images of the same captions in the scorer's feature space,
model evaluations per image (NFE: Heun n steps = 2n - 1; AR = one per token with the KV cache;
guidance doubles the rows of a call, not the calls) and wall seconds per image on this machine
(sampling + text encoding + scoring). The real images
themselves are scored too: the scorer's ceiling, and the split-half Fréchet floor at this n.

Writes ``--out`` (a table in JSON and markdown, and a PNG: caption accuracy and Fréchet distance
against model evaluations and against seconds per image) and logs them to the demo's MLflow store (experiment
``latentpipe-quality``).

Usage: python benchmarks/quality.py --workdir DIR [--scale tiny|small] [--scorer DIR] [--n 200] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from latentpipe.training.evaluation import (
    EVAL_SEED,
    evaluate_prior,
    features,
    frechet_distance,
    load_scorer,
    scene_batch,
    score_images,
)
from latentpipe.training.generate import Prior, SampleOptions

ROOT = Path(__file__).resolve().parents[1]
SETTINGS: dict[str, list[tuple[str, SampleOptions]]] = {
    "ddpm": [("ddpm-1000", SampleOptions(sampler="ddpm", steps=1000)),
             ("ddim-50", SampleOptions(sampler="ddim", steps=50)),
             ("ddim-20", SampleOptions(sampler="ddim", steps=20))],
    "flow": [("euler-50", SampleOptions(sampler="euler", steps=50)),
             ("euler-20", SampleOptions(sampler="euler", steps=20)),
             ("euler-10", SampleOptions(sampler="euler", steps=10)),
             ("heun-10", SampleOptions(sampler="heun", steps=10))],
    "ar": [("ar-cfg", SampleOptions()),
           ("ar-no-cfg", SampleOptions(guidance=1.0))],
}
COLUMNS = ("caption_accuracy", "presence", "shape", "colour", "size", "count", "frechet", "nfe",
           "seconds_per_image")


def nfe(family: str, options: SampleOptions, tokens: int) -> int:
    """Model evaluations per image."""
    if family == "ar":
        return tokens
    assert options.steps is not None
    return 2 * options.steps - 1 if options.sampler == "heun" else options.steps


@torch.no_grad()
def through_autoencoder(export: Path, real: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The real images encoded and decoded by an autoencoder export (KL: posterior mean; VQ: nearest codes)."""
    from latentpipe.training.export import load_export
    from latentpipe.training.models.autoencoders import reconstruct

    _, model = load_export(export)
    model.eval()
    return torch.cat([reconstruct(model, real[i:i + batch_size]).clamp(-1, 1) for i in range(0, len(real), batch_size)])


def measure(workdir: Path, scorer_dir: Path, n: int, batch_size: int, families: list[str]) -> list[dict[str, Any]]:
    scorer = load_scorer(scorer_dir)
    real, attrs = scene_batch(EVAL_SEED, 0, n, scorer.cfg.size)
    nan = {"frechet": float("nan"), "nfe": float("nan"), "seconds_per_image": float("nan")}
    rows: list[dict[str, Any]] = [{"prior": "real images", "setting": "-", **score_images(scorer, real, attrs), **nan}]
    # The ceiling each stage-1 model puts on its priors: real scenes through encode + decode.
    for ae in ("kl-vae", "vqgan"):
        export = workdir / "runs" / ae / "export"
        if (export / "export.json").is_file():
            recon = through_autoencoder(export, real, batch_size)
            f_rec, f_real = features(scorer, recon), features(scorer, real)
            rows.append({"prior": ae, "setting": "reconstruction", **score_images(scorer, recon, attrs), **nan,
                         "frechet": frechet_distance(f_rec, f_real)})
    for family in families:
        export = workdir / "runs" / family / "export"
        if not (export / "export.json").is_file():
            print(f"{family}: no export under {export}; skipped", file=sys.stderr)
            continue
        prior = Prior(export)
        for label, options in SETTINGS[family]:
            options.batch_size, options.seed = batch_size, 0
            t0 = time.perf_counter()
            metrics, _, _ = evaluate_prior(prior, scorer, n, options)
            seconds = (time.perf_counter() - t0) / n
            if rows[0]["frechet"] != rows[0]["frechet"]:  # the real set's split-half floor, once
                rows[0]["frechet"] = metrics["frechet_real_halves"]
            grid = getattr(getattr(prior.family.cfg, "net", None), "grid", (0, 0))
            row = {"prior": family, "setting": label, **metrics, "nfe": nfe(family, options, grid[0] * grid[1]),
                   "seconds_per_image": seconds}
            rows.append(row)
            print(f"{family:>5} {label:<10} caption acc {row['caption_accuracy']:.3f}  "
                  f"Frechet {row['frechet']:.2f}  {seconds:.3f} s/image", file=sys.stderr, flush=True)
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    head = "| prior | setting | " + " | ".join(COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 2)]
    for r in rows:
        cells = [f"{r[c]:.2f}" if c == "frechet" else f"{r[c]:.0f}" if c == "nfe" else f"{r[c]:.3f}" for c in COLUMNS]
        lines.append(f"| {r['prior']} | {r['setting']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    colours = {"ddpm": "tab:blue", "flow": "tab:orange", "ar": "tab:green"}
    for i, (key, label) in enumerate((("caption_accuracy", "caption accuracy"),
                                      ("frechet", "Fréchet distance (scorer features)"))):
        for j, (xkey, xlabel) in enumerate((("nfe", "model evaluations per image"),
                                            ("seconds_per_image", "seconds per image (this machine)"))):
            ax = axes[i][j]
            for r in rows[1:]:
                if r["prior"] not in colours:  # the autoencoder ceilings have no sampling cost
                    continue
                ax.scatter(r[xkey], r[key], color=colours[r["prior"]], s=30)
                ax.annotate(r["setting"], (r[xkey], r[key]), fontsize=7, xytext=(3, 3), textcoords="offset points")
            ax.axhline(rows[0][key], color="grey", linestyle="--", linewidth=1)
            ax.set_xscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(label)
    for fam, c in colours.items():
        axes[0][0].scatter([], [], color=c, label=fam)
    axes[0][0].plot([], [], color="grey", linestyle="--", label="real images (scorer ceiling / split-half floor)")
    axes[0][0].legend(fontsize=7, loc="best")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def log_to_mlflow(workdir: Path, out: Path, rows: list[dict[str, Any]], params: dict[str, Any]) -> None:
    import mlflow

    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{workdir.resolve() / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("latentpipe-quality")
    exp_id = exp.experiment_id if exp else client.create_experiment("latentpipe-quality")
    run = client.create_run(exp_id, run_name=f"quality-n{params['n']}")
    for k, v in params.items():
        client.log_param(run.info.run_id, k, v)
    for r in rows[1:]:
        for c in COLUMNS:
            client.log_metric(run.info.run_id, f"{r['prior']}/{r['setting']}/{c}", float(r[c]))
    for f in ("quality.png", "quality.json", "quality.md"):
        client.log_artifact(run.info.run_id, str(out / f))
    keys = list(dict.fromkeys(k for r in rows for k in r))  # the quality-vs-cost table, sortable in the UI
    client.log_table(run.info.run_id, {k: [r.get(k) for r in rows] for k in keys}, "quality_table.json")
    client.set_terminated(run.info.run_id)
    print(f"logged to MLflow {uri}, experiment latentpipe-quality, run {run.info.run_id}", file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, required=True, help="the demo workdir (trained first if not finished)")
    ap.add_argument("--scale", choices=["tiny", "medium", "small"], default="tiny", help="the demo's training budget")
    ap.add_argument("--scorer", type=Path, help="scorer folder (default WORKDIR/scorer, the demo's own)")
    ap.add_argument("--n", type=int, default=200, help="held-out prompts per setting")
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--families", default="ddpm,flow,ar")
    ap.add_argument("--out", type=Path, help="output folder (default WORKDIR/quality)")
    ap.add_argument("--no-mlflow", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not (args.workdir / "demo_summary.json").is_file():  # train: the demo's real stages at this scale
        subprocess.run([sys.executable, "-m", "latentpipe.pipeline.cli", "demo", "--scale", args.scale, "--workdir",
                        str(args.workdir)], check=True, cwd=ROOT)
    out = args.out or args.workdir / "quality"
    out.mkdir(parents=True, exist_ok=True)
    summary = args.workdir / "demo_summary.json"
    demo_cfg = json.loads(summary.read_text()).get("config", {}) if summary.is_file() else {}
    params = {"n": args.n, "seed": EVAL_SEED, "threads": torch.get_num_threads(), "workdir": str(args.workdir),
              "load_average_start": round(os.getloadavg()[0], 1)}
    scorer = args.scorer or args.workdir / "scorer"
    params["scorer"] = str(scorer)
    rows = measure(args.workdir, scorer, args.n, args.batch_size, args.families.split(","))
    params["load_average_end"] = round(os.getloadavg()[0], 1)
    (out / "quality.json").write_text(json.dumps({"params": params, "demo_config": demo_cfg, "rows": rows}, indent=2))
    table = markdown(rows)
    (out / "quality.md").write_text(table + "\n")
    plot(rows, out / "quality.png", f"{args.workdir.name}: n={args.n} held-out prompts; "
                                    f"load {params['load_average_start']}-{params['load_average_end']}")
    if not args.no_mlflow:
        log_to_mlflow(args.workdir, out, rows, params)
    print(table)
    print(f"wrote {out / 'quality.png'}, {out / 'quality.json'}", file=sys.stderr)


if __name__ == "__main__":
    main()
