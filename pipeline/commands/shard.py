"""Turn image-caption data (folder, parquet/CSV/JSONL table, WebDataset tars, or synthetic:N)
into clean, resumable WebDataset image shards with a Ray job: OUT/images/shard-NNNNNN.tar,
.stats.json per shard, _index.parquet and _manifest.json. Rerun the same command to finish an
interrupted run; only missing shards are written."""

from __future__ import annotations

import argparse
import logging
import sys

from latentpipe.pipeline.cli import UserError, add_config_arguments, print_config_and_exit, resolve_config
from latentpipe.pipeline.shard import ShardConfig, run_shard_job
from latentpipe.pipeline.shard_store import OutputMismatchError
from latentpipe.preprocessing.sources import SourceError

NAME = "shard"
HELP = "turn image-caption sources into WebDataset image shards (Ray job)"
log = logging.getLogger("latentpipe.shard")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", help="folder, table (.parquet/.csv/.jsonl, glob ok), tar glob/brace pattern, "
                                    "or synthetic:N")
    p.add_argument("--out", help="output root; shards go to OUT/images (local path or filesystem URL)")
    p.add_argument("--size", type=int, help="output image side in px (default 64)")
    p.add_argument("--resize", choices=["center-crop", "pad", "none"], help="resize mode (default center-crop)")
    p.add_argument("--format", choices=["jpg", "png", "webp"], help="stored image format (default jpg)")
    p.add_argument("--samples-per-shard", type=int, help="inputs per shard (default 1000)")
    p.add_argument("--ray-address", help="join this Ray cluster (auto, ray://...); default: a local one")
    p.add_argument("--overwrite", action="store_true", help="replace an output made with another config/source")
    p.add_argument("--retry-transient", action="store_true",
                   help="also redo complete shards whose stats record transient failures (timeouts, 5xx, ...)")
    p.add_argument("--allow-pipe", action="store_true", help="allow pipe:CMD tar sources (runs a shell command)")
    add_config_arguments(p)


def run(args: argparse.Namespace) -> int:
    cfg = resolve_config(ShardConfig, args, {
        "source.spec": args.source, "out": args.out, "image.size": args.size, "image.resize": args.resize,
        "image.format": args.format, "samples_per_shard": args.samples_per_shard, "ray_address": args.ray_address,
        "source.allow_pipe": True if args.allow_pipe else None,
    })
    if print_config_and_exit(cfg, args):
        return 0
    if not cfg.source.spec:
        raise UserError("--source is required")
    if not cfg.out:
        raise UserError("--out is required")
    try:
        result = run_shard_job(cfg, overwrite=args.overwrite, retry_transient=args.retry_transient)
    except (SourceError, OutputMismatchError) as e:
        raise UserError(str(e)) from None
    print(result.summary, file=sys.stderr)
    if result.failed or result.manifest is None:
        for i, msg in sorted(result.failed.items()):
            print(f"shard {i}: {msg}", file=sys.stderr)
        print(f"latentpipe shard: {result.num_shards - len(result.stats)} of {result.num_shards} shards "
              f"incomplete; rerun the same command to finish", file=sys.stderr)
        return 1
    log.info("dataset complete: %s (%d samples in %d shards)", result.out,
             result.manifest["totals"]["written"], result.num_shards)
    return 0
