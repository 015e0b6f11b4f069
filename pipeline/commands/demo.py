"""Run the whole pipeline on embedded defaults: synthetic scenes -> shard -> KL-VAE (and VQGAN) ->
encode -> diffusion and flow (and autoregressive) priors (DeepSpeed, 2 CPU ranks or the GPUs present)
-> eval -> sample grids, all tracked and registered in MLflow. A rerun skips complete stages."""

from __future__ import annotations

import argparse
import sys

from latentpipe.pipeline.cli import add_config_arguments, print_config_and_exit, resolve_config

NAME = "demo"
HELP = "run every stage on built-in data: shards, autoencoders, latents, priors, eval, samples"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", help="where everything is written (default demo-run)")
    p.add_argument("--scale", choices=["tiny", "medium", "small"],
                   help="tiny: minutes on a 2-core CPU; medium: about an hour there; small: a GPU machine's budget")
    p.add_argument("--ray-address", help="run the data stages on this Ray cluster (default: a local one)")
    p.add_argument("--fresh", action="store_true", help="delete the workdir and redo every stage")
    add_config_arguments(p)


def run(args: argparse.Namespace) -> int:
    from latentpipe.pipeline.demo import Demo, DemoConfig, format_summary

    cfg = resolve_config(DemoConfig, args, {"workdir": args.workdir, "scale": args.scale,
                                            "ray_address": args.ray_address})
    if print_config_and_exit(cfg, args):
        return 0
    result = Demo(cfg, fresh=args.fresh).run()
    print(format_summary(result), file=sys.stderr)
    return 0
