"""Train a model family with DeepSpeed: locally, under torchrun / the deepspeed launcher, or on Ray Train."""

from __future__ import annotations

import argparse

from latentpipe.pipeline.cli import UserError, add_config_arguments, print_config_and_exit, resolve_config

NAME = "train"
HELP = "train a model family (DeepSpeed ZeRO; local, torchrun, deepspeed or Ray Train)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--launcher", choices=["local", "torchrun", "deepspeed", "ray"], default="local",
                   help="how ranks are started (default local: one rank in this process)")
    p.add_argument("--nproc", type=int, default=1, help="ranks per node (ray: workers in all)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest complete checkpoint in the workdir (an error if none)")
    p.add_argument("--resume-on-changed-data", action="store_true",
                   help="with --resume: continue even though the shards, data.seed or global batch changed "
                        "(otherwise refused, naming what differs)")
    p.add_argument("--nnodes", type=int, default=1, help="nodes (torchrun/deepspeed multi-node)")
    p.add_argument("--node-rank", type=int, default=0, help="this node's rank (torchrun, deepspeed --no_ssh)")
    p.add_argument("--master-addr", help="rendezvous host of node 0 (multi-node)")
    p.add_argument("--master-port", type=int, help="rendezvous port (multi-node)")
    p.add_argument("--hostfile", help="deepspeed launcher hostfile (ssh/pdsh multi-node)")
    add_config_arguments(p)


def run(args: argparse.Namespace) -> int:
    from latentpipe.training.config import TrainConfig
    from latentpipe.training.families import family_for_data
    from latentpipe.training.launch import LaunchOptions, launch
    from latentpipe.training.tar_index import resolve_shards
    from latentpipe.training.workdir_lock import LOCK_NAME, WorkdirInUseError, WorkdirLock

    cfg = resolve_config(TrainConfig, args, {"resume": True if args.resume else None,
                                             "resume_on_changed_data": True if args.resume_on_changed_data else None})
    if print_config_and_exit(cfg, args):
        return 0
    if not cfg.data.shards:
        raise UserError("data.shards is required (a folder of shard-*.tar, or a glob of tars)")
    family = family_for_data(cfg.model, cfg.data.kind)  # bad model keys or data kind fail here, once, not per rank
    opts = LaunchOptions(launcher=args.launcher, nproc=args.nproc, nnodes=args.nnodes, node_rank=args.node_rank,
                         master_addr=args.master_addr, master_port=args.master_port, hostfile=args.hostfile)
    if opts.nproc < 1 or opts.nnodes < 1:
        raise UserError("--nproc and --nnodes must be >= 1")
    if opts.launcher == "local" and (opts.nproc != 1 or opts.nnodes != 1):
        raise UserError("the local launcher runs one rank: use --launcher torchrun|deepspeed|ray for more")
    family.bind_data(resolve_shards(cfg.data.shards)[2])  # e.g. a latent prior's factors against the manifest
    # One run per workdir (per node of a multi-node run), held from before any rank starts to the end.
    name = LOCK_NAME if opts.node_rank == 0 else f"train.node-{opts.node_rank}.lock"
    try:
        lock = WorkdirLock(cfg.workdir, name)
        lock.acquire()
    except WorkdirInUseError as e:
        raise UserError(str(e)) from None
    try:
        return launch(cfg, opts)
    finally:
        lock.release()
