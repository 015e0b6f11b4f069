"""Evaluate a trained prior on held-out built-in captions: caption accuracy and per-attribute
accuracy read by the scene scorer, and the Fréchet distance to real images in the scorer's
feature space. `latentpipe eval train-scorer` trains that scorer first."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from latentpipe.pipeline.cli import UserError

NAME = "eval"
HELP = "score a prior's samples (caption accuracy, Frechet distance); train-scorer trains the judge"
log = logging.getLogger("latentpipe.eval")
DEFAULT_SCORER = Path.home() / ".cache" / "latentpipe" / "scorer"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", nargs="?", choices=["train-scorer"], help="train-scorer: train the scene scorer")
    p.add_argument("--model", metavar="URI", help="models:/name@alias, an export folder or a workdir")
    p.add_argument("--scorer", default=str(DEFAULT_SCORER), help=f"scorer folder (default {DEFAULT_SCORER})")
    p.add_argument("--n", type=int, default=500, help="held-out prompts to sample (default 500)")
    p.add_argument("--sampler", help="ddpm|ddim (diffusion), euler|heun (flow)")
    p.add_argument("--steps", type=int, help="sampling steps (default: the model's own)")
    p.add_argument("--cfg", type=float, help="classifier-free guidance scale")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--out", help="write the metrics JSON and a sample grid PNG into this folder")
    p.add_argument("--no-log", action="store_true", help="do not log to the model's MLflow run")
    p.add_argument("--experiment", default="latentpipe",
                   help="experiment of the eval run when --model is not a registered model (default latentpipe)")
    p.add_argument("--scorer-steps", type=int, help="train-scorer: optimisation steps (default 2000)")
    p.add_argument("--scorer-samples", type=int, help="train-scorer: training scenes (default 30000)")


def run(args: argparse.Namespace) -> int:
    if args.action == "train-scorer":
        return _train_scorer(args)
    if not args.model:
        raise UserError("--model is required (or use `latentpipe eval train-scorer`)")
    from latentpipe.training.evaluation import evaluate_prior, load_scorer
    from latentpipe.training.generate import Prior, SampleOptions, labelled_grid, to_pil

    if args.n < 4:
        raise UserError("--n must be >= 4")
    try:
        opt = SampleOptions(sampler=args.sampler, steps=args.steps, guidance=args.cfg, seed=args.seed,
                            batch_size=args.batch_size)
    except ValueError as e:
        raise UserError(str(e)) from None
    scorer = load_scorer(Path(args.scorer))
    try:
        prior = Prior(args.model)
    except ValueError as e:
        raise UserError(str(e)) from None
    t0 = time.monotonic()
    metrics, images, prompts = evaluate_prior(prior, scorer, args.n, opt)
    metrics["sampling_seconds_per_image"] = (time.monotonic() - t0) / args.n
    grid = labelled_grid(to_pil(images[:32]), [], per_row=8, scale=2, label_width=0)
    settings = {"model": args.model, "family": prior.kind, "n": args.n, "sampler": args.sampler,
                "steps": args.steps, "cfg": args.cfg, "seed": args.seed}
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps({**settings, **metrics}, indent=2))
        grid.save(out / "samples.png")
    if not args.no_log:
        log_to_mlflow(args.model, prior.meta, metrics, settings, grid, args.experiment)
    width = max(len(k) for k in metrics)
    print(f"{prior.kind} model {args.model} on {args.n} held-out prompts", file=sys.stderr)
    for k, v in metrics.items():
        print(f"  {k:<{width}}  {v:.4f}", file=sys.stderr)
    return 0


def _train_scorer(args: argparse.Namespace) -> int:
    from latentpipe.training.evaluation import ScorerConfig, train_scorer

    cfg = ScorerConfig()
    for flag, value in (("--scorer-steps", args.scorer_steps), ("--scorer-samples", args.scorer_samples)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be >= 1")
    if args.scorer_steps is not None:
        cfg.steps = args.scorer_steps
    if args.scorer_samples is not None:
        cfg.train_samples = args.scorer_samples
    report = train_scorer(cfg, Path(args.scorer))
    print(f"scorer saved to {args.scorer}; held-out real scenes:", file=sys.stderr)
    for k, v in report.items():
        print(f"  {k:<16}  {v:.4f}", file=sys.stderr)
    return 0


def log_to_mlflow(uri: str, meta: dict, metrics: dict[str, float], settings: dict, grid: object,
                  experiment: str = "latentpipe") -> None:
    """Log an evaluation where a person looks for it.

    To the run that produced a registered model (``models:/name@alias`` or ``models:/name/N``),
    else to a new run ``eval <family> <model>`` in ``experiment``: the metrics as
    ``eval/<settings>/<metric>``, the sample grid ``eval/<settings>/samples.png`` and one row
    per evaluation in the sortable table ``eval/results.json`` (``mlflow.log_table``). A
    registered version also gets the results as tags (``eval.<metric>``, ``eval.settings``,
    ``eval.run_id``), so the registry page compares versions.
    """
    import mlflow

    client = mlflow.MlflowClient()
    mv = None
    tag = "-".join(str(settings[k]) for k in ("sampler", "steps", "cfg") if settings[k] is not None) or "default"
    try:
        if uri.startswith("models:/"):
            name_ver = uri.removeprefix("models:/")
            if "@" in name_ver:
                mv = client.get_model_version_by_alias(*name_ver.split("@", 1))
            else:
                mv = client.get_model_version(*name_ver.split("/", 1))
        if mv is None:
            mlflow.set_experiment(experiment)
        name = None if mv else f"eval {meta['family']} {uri.rstrip('/').rsplit('/', 1)[-1]}"
        with mlflow.start_run(run_id=mv.run_id if mv else None, run_name=name) as run:
            mlflow.log_metrics({f"eval/{tag}/{k}": float(v) for k, v in metrics.items()})
            mlflow.log_image(grid, f"eval/{tag}/samples.png")  # type: ignore[arg-type]
            row = {"model": uri, "version": mv.version if mv else None, "settings": tag, "n": settings["n"],
                   "seed": settings["seed"], **{k: float(v) for k, v in metrics.items()}}
            mlflow.log_table({k: [v] for k, v in row.items()}, artifact_file="eval/results.json")
        if mv is not None:
            for key, value in {**{f"eval.{k}": f"{float(v):.4g}" for k, v in metrics.items()},
                               "eval.settings": f"{tag} n={settings['n']} seed={settings['seed']}",
                               "eval.run_id": run.info.run_id}.items():
                client.set_model_version_tag(mv.name, mv.version, key, value)
    except Exception as e:  # tracking must never lose the printed result
        log.warning("could not log the evaluation to MLflow (%s); metrics printed below", e)
