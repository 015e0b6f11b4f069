"""Sample images from a trained prior (diffusion, flow or autoregressive) for text prompts and
write a labelled grid: one row per prompt. MODEL is an MLflow model URI (models:/name@alias),
an export folder or a training workdir."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from latentpipe.pipeline.cli import UserError

NAME = "sample"
HELP = "sample images for prompts from a trained prior and write a labelled grid"
log = logging.getLogger("latentpipe.sample")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="URI", help="models:/name@alias, an export folder or a workdir")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for more)")
    p.add_argument("--prompts-file", help="a text file with one prompt per line")
    p.add_argument("--n", type=int, default=8, help="images per prompt (default 8)")
    p.add_argument("--sampler", help="ddpm|ddim (diffusion), euler|heun (flow); default: the model's own")
    p.add_argument("--steps", type=int, help="sampling steps (default: the model's own)")
    p.add_argument("--cfg", type=float, help="classifier-free guidance scale (0 unconditional, 1 conditional)")
    p.add_argument("--temperature", type=float, help="autoregressive: sampling temperature")
    p.add_argument("--top-k", type=int, help="autoregressive: keep the k most likely codes")
    p.add_argument("--top-p", type=float, help="autoregressive: nucleus probability")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward batch (default 32)")
    p.add_argument("--text-encoder", help="override the text encoder recorded with the model")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--out", default="samples.png", help="grid PNG to write (default samples.png)")
    p.add_argument("--out-dir", help="also write every image as its own PNG into this folder")
    p.add_argument("--scale", type=int, default=2, help="grid upscaling factor for small images (default 2)")


def check_device(device: str | None) -> None:
    """A device this machine has, or a one-line error naming it (before any model is loaded)."""
    if device is None:
        return
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"--device {device}: not a device (cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA device is available on this machine (use --device cpu)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UserError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def run(args: argparse.Namespace) -> int:
    from latentpipe.training.generate import Prior, SampleOptions, labelled_grid, to_pil

    prompts = list(args.prompt)
    if args.prompts_file:
        prompts += [ln.strip() for ln in Path(args.prompts_file).read_text(encoding="utf-8").splitlines() if ln.strip()]
    if not prompts:
        raise UserError("give at least one --prompt (or --prompts-file)")
    if args.n < 1 or args.batch_size < 1 or args.scale < 1:
        raise UserError("--n, --batch-size and --scale must be >= 1")
    try:
        opt = SampleOptions(sampler=args.sampler, steps=args.steps, guidance=args.cfg, seed=args.seed,
                            batch_size=args.batch_size, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p)
        check_device(args.device)
        prior = Prior(args.model, text_encoder=args.text_encoder, device=args.device)
        expanded = [p for p in prompts for _ in range(args.n)]
        images = to_pil(prior.images(expanded, opt))
    except ValueError as e:
        raise UserError(str(e)) from None
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    labelled_grid(images, prompts, per_row=args.n, scale=args.scale).save(out)
    if args.out_dir:
        d = Path(args.out_dir)
        d.mkdir(parents=True, exist_ok=True)
        for i, im in enumerate(images):
            im.save(d / f"{i // args.n:03d}-{i % args.n:03d}.png")
    log.info("wrote %d samples (%s, %d prompts) to %s", len(images), prior.kind, len(prompts), out)
    return 0
