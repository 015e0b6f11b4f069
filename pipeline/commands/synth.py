"""Write N built-in captioned scenes as a folder (image + .txt + .json) or a parquet table."""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from latentpipe.pipeline.cli import UserError, add_config_arguments, print_config_and_exit, resolve_config
from latentpipe.preprocessing.config import save_config
from latentpipe.preprocessing.progress import Progress
from latentpipe.preprocessing.synthetic import Scene, iter_scenes, write_folder, write_parquet

NAME = "synth"
HELP = "generate built-in captioned scenes (folder or parquet)"
log = logging.getLogger("latentpipe.synth")


@dataclass
class SynthConfig:
    out: str = ""
    n: int = 1000
    size: int = 32
    seed: int = 0
    start: int = 0
    format: Literal["folder", "parquet"] = "folder"
    image_format: Literal["png", "jpg", "webp"] = "png"

    def __post_init__(self) -> None:
        if self.n < 0:
            raise ValueError(f"n must be >= 0, got {self.n}")
        if not 32 <= self.size <= 512:
            raise ValueError(f"size must be between 32 and 512, got {self.size}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", help="output folder (required)")
    p.add_argument("--n", type=int, help="number of samples (default 1000)")
    p.add_argument("--size", type=int, help="square image size in px, 32..512 (default 32)")
    p.add_argument("--seed", type=int, help="dataset seed (default 0)")
    p.add_argument("--format", choices=["folder", "parquet"], help="folder of files or one parquet table")
    p.add_argument("--image-format", choices=["png", "jpg", "webp"], help="image encoding (default png)")
    add_config_arguments(p)


def run(args: argparse.Namespace) -> int:
    cfg = resolve_config(SynthConfig, args, {
        "out": args.out, "n": args.n, "size": args.size, "seed": args.seed,
        "format": args.format, "image_format": args.image_format,
    })
    if print_config_and_exit(cfg, args):
        return 0
    if not cfg.out:
        raise UserError("--out is required")
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    t0 = time.monotonic()
    progress = Progress(cfg.n, "synth", unit="img")

    def counted() -> Iterator[tuple[int, Scene]]:
        for item in iter_scenes(cfg.n, cfg.seed, cfg.size, cfg.start):
            yield item
            progress.update(1)

    with progress:
        if cfg.format == "folder":
            n = write_folder(out, counted(), cfg.image_format)
            where = out
        else:
            where = out / "scenes.parquet"
            n = write_parquet(where, counted(), cfg.image_format)
    save_config(cfg, out / "synth_config.yaml")
    dt = time.monotonic() - t0
    log.info("wrote %d %dpx scenes to %s in %.1fs (%.0f img/s)", n, cfg.size, where, dt, n / max(dt, 1e-9))
    return 0
