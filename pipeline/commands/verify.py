"""Check training checkpoints without training: every file against the digest recorded when the
checkpoint completed, then read back the way ``--resume`` reads it (weights-only, never unpickled).

PATH is one checkpoint folder (``step-NNNNNN``), a checkpoints folder, or a training workdir.
Exit 0 when every complete checkpoint checked is intact; 1 naming each bad file otherwise.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from latentpipe.pipeline.cli import UserError

NAME = "verify"
HELP = "check training checkpoints (digests, weights-only reads) without training"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", metavar="CHECKPOINT_DIR|WORKDIR",
                   help="a step-NNNNNN checkpoint, a checkpoints folder, or a training workdir")


def run(args: argparse.Namespace) -> int:
    from latentpipe.training.checkpoint import MARKER, check, list_complete

    path = Path(args.path)
    if not path.is_dir():
        raise UserError(f"{path}: no such folder")
    if (path / MARKER).exists() or path.name.startswith("step-"):
        found = [c for c in list_complete(path.parent) if c.path.name == path.name]
        if not found:
            raise UserError(f"{path}: not a complete checkpoint (no valid {MARKER} marker)")
    else:
        root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        found = list_complete(root)
        if not found:
            raise UserError(f"{root}: no complete checkpoint")
    bad = 0
    for info in reversed(found):
        problem = check(info)
        if problem is None:
            note = "" if info.files is not None else " (no digests: saved by an older latentpipe)"
            print(f"ok   {info.path}: {len(info.files or {})} files{note}")
        else:
            bad += 1
            print(f"BAD  {info.path}: {problem}")
    return 1 if bad else 0
