"""Precompute VAE latents, VQGAN tokens and text embeddings of image shards into latent shards (Ray).

Output: <out>/latents/<encoder-id>/shard-NNNNNN.tar with the same shard numbers and keys as
the image shards; a rerun skips finished shards. --vae / --vqgan take a local diffusers
folder, a latentpipe export folder or an MLflow model URI (models:/name@alias);
--text-encoder takes "minilm" (the bundled sentence encoder) or a local transformers folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from latentpipe.pipeline.cli import UserError, add_config_arguments, print_config_and_exit, resolve_config
from latentpipe.pipeline.encode import EncodeConfig, run_encode

NAME = "encode"
HELP = "precompute latents, VQ tokens and text embeddings of image shards (Ray)"
log = logging.getLogger("latentpipe.encode")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", help="folder of image shards, e.g. DIR/images (required)")
    p.add_argument("--out", help="dataset root; writes OUT/latents/<encoder-id>/ (required)")
    p.add_argument("--vae", metavar="URI", help="KL-VAE: diffusers folder, export folder or models:/name@alias")
    p.add_argument("--vqgan", metavar="URI", help="VQGAN: diffusers folder, export folder or models:/name@alias")
    p.add_argument("--text-encoder", metavar="NAME_OR_PATH",
                   help='"minilm" (bundled) or a local transformers folder (CLIP text, T5 encoder)')
    p.add_argument("--text-max-length", type=int, help="max caption tokens (default 77)")
    p.add_argument("--text-dtype", choices=["float16", "float32"], help="stored text embeddings (default float16)")
    p.add_argument("--batch-size", type=int, help="encoder batch size (default 64)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="encoder device (default auto)")
    p.add_argument("--num-actors", type=int, help="encoder actors (default: one per GPU, or per 2 CPUs)")
    p.add_argument("--ray-address", help='join a Ray cluster ("auto", "ray://host:10001"); default: local')
    p.add_argument("--mlflow-uri", help="MLflow registry for models:/ URIs (default $MLFLOW_TRACKING_URI)")
    p.add_argument("--overwrite", action="store_true", default=None, help="re-encode every shard")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    add_config_arguments(p)


def run(args: argparse.Namespace) -> int:
    cfg = resolve_config(EncodeConfig, args, {
        "images": args.images, "out": args.out, "vae": args.vae, "vqgan": args.vqgan,
        "text_encoder": args.text_encoder, "text_max_length": args.text_max_length,
        "text_dtype": args.text_dtype, "batch_size": args.batch_size, "device": args.device,
        "num_actors": args.num_actors, "ray_address": args.ray_address, "mlflow_uri": args.mlflow_uri, "overwrite": args.overwrite,
    })
    if print_config_and_exit(cfg, args):
        return 0
    if not cfg.images or not cfg.out:
        raise UserError("--images and --out are required")
    if not (cfg.vae or cfg.vqgan or cfg.text_encoder):
        raise UserError("no encoder given: pass at least one of --vae, --vqgan, --text-encoder")
    summary = run_encode(cfg)
    if "table" in summary:
        print(summary.pop("table"), file=sys.stderr)
    if summary["incomplete_inputs"]:
        print(f"latentpipe encode: {len(summary['incomplete_inputs'])} input shards are not complete yet; "
              "rerun once `latentpipe shard` has finished them", file=sys.stderr)
    print(json.dumps(summary, sort_keys=True) if args.json else summary["out_dir"])
    return 0
