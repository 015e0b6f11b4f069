"""Prior recipes side by side on one latent shard folder: learning rate, backbone, EMA vs raw weights,
guidance scale, and steps.

Trains a ``ddpm`` or ``flow`` prior in this process (plain AdamW with the trainer's warmup, no
DeepSpeed: the recipe is what is compared, not the engine) on the latents and text embeddings of
``--latents`` (a ``latentpipe encode`` output, whose KL-VAE ``--vae`` decodes the samples), and at
each ``--eval-at`` step samples ``--n`` held-out built-in prompts with the raw weights and with the
EMA (the trainer's power-function warm-up: decay min(``--ema``, 1 - (1 + n)^-p) at update n), at every
``--guidance`` scale, and scores them with the scene scorer (``--scorer``). Every row is printed
and appended to ``--out`` (JSONL) as it is measured, with a sample grid PNG beside it; run several
recipes as separate processes at once and compare their rows (same data, prompts and seeds).

Usage: python benchmarks/prior_recipe.py --latents ROOT/latents/ID --vae KL_EXPORT --scorer SCORER \\
    --family flow --backbone dit_demo --lr 1e-3 --batch-size 64 --steps 2000 --eval-at 500,1000 --out rows.jsonl
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from latentpipe.preprocessing.encoders import TextEncoder
from latentpipe.preprocessing.synthetic import make_scene
from latentpipe.training.data import DataConfig, ShardStream
from latentpipe.training.evaluation import (
    EVAL_SEED,
    load_scorer,
    scene_batch,
    score_by_object_count,
    score_images,
)
from latentpipe.training.families import get_family
from latentpipe.training.generate import labelled_grid, to_pil
from latentpipe.training.guidance import TextCond


def load_latents(root: Path, max_len: int) -> dict[str, torch.Tensor]:
    """Every sample of the latent shards once, in memory: latent [N, 2C, h, w], text [N, L, D], text_mask [N, L]."""
    stream = ShardStream(DataConfig(shards=str(root), kind="latents", batch_size=256, max_text_len=max_len,
                                    num_workers=0), rank=0, world_size=1)
    parts: dict[str, list[torch.Tensor]] = {"latent": [], "text": [], "text_mask": []}
    left = stream.num_samples  # the first epoch of the stream's order holds every sample once
    for batch in stream.batches():
        take = min(left, len(batch["latent"]))
        for k in parts:
            parts[k].append(batch[k][:take])
        left -= take
        if left == 0:
            break
    return {k: torch.cat(v) for k, v in parts.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--latents", type=Path, required=True)
    ap.add_argument("--vae", required=True, help="the KL-VAE export that made the latents (decodes samples)")
    ap.add_argument("--scorer", type=Path, required=True)
    ap.add_argument("--family", choices=["flow", "ddpm"], default="flow")
    ap.add_argument("--backbone", default="dit_demo")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--eval-at", default="", help="comma-separated steps (the last step is always evaluated)")
    ap.add_argument("--guidance", default="1,2,4,7")
    ap.add_argument("--ema", type=float, default=0.999, help="EMA decay (0: raw weights only)")
    ap.add_argument("--ema-power", type=float, default=0.75, help="EMA warm-up power (ema.warmup_power)")
    ap.add_argument("--n", type=int, default=200, help="held-out prompts per evaluation")
    ap.add_argument("--max-text-len", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", type=Path, required=True, help="JSONL rows (appended); grids beside it")
    a = ap.parse_args()
    torch.manual_seed(a.seed)
    man = json.loads((a.latents / "_manifest.json").read_text())
    data = load_latents(a.latents, a.max_text_len)
    cls = get_family(a.family)
    fam = cls(cls.config_class(backbone=a.backbone, scaling_factor=float(man.get("scaling_factor") or 1.0),
                               shift_factor=float(man.get("shift_factor") or 0.0), vae=a.vae))
    model = fam.build()["model"]
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(a.warmup, 1)))
    ema = [p.detach().clone() for p in model.parameters()] if a.ema else None
    scorer = load_scorer(a.scorer)
    text_encoder = TextEncoder(None, max_length=a.max_text_len, device="cpu")
    prompts = [make_scene(EVAL_SEED, i, 32).caption for i in range(a.n)]
    _, attrs = scene_batch(EVAL_SEED, 0, a.n, scorer.cfg.size)
    enc = text_encoder.encode(prompts)
    ptext = torch.from_numpy(np.asarray(enc["text"], np.float32))  # [n, L, D]
    pmask = torch.from_numpy(np.asarray(enc["text_mask"]))  # [n, L]
    eval_at = {int(s) for s in a.eval_at.split(",") if s} | {a.steps}
    tag = a.tag or f"{a.family}-{a.backbone}-lr{a.lr:g}-b{a.batch_size}"
    recipe = {"tag": tag, "family": a.family, "backbone": a.backbone, "lr": a.lr, "batch_size": a.batch_size,
              "ema_power": a.ema_power,
              "samples": len(data["latent"]), "params": sum(p.numel() for p in model.parameters())}
    print(json.dumps(recipe), flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(a.seed + 1)
    t0 = time.time()
    for step in range(1, a.steps + 1):
        idx = torch.randint(0, len(data["latent"]), (a.batch_size,), generator=g)
        model.train()
        loss, _ = fam.loss("model", {"model": model}, {k: v[idx] for k, v in data.items()}, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if ema is not None:
            d = min(a.ema, 1.0 - step ** -a.ema_power)  # update n = step - 1: 1 - (1 + n)^-power
            with torch.no_grad():
                torch._foreach_lerp_(ema, [p.detach() for p in model.parameters()], 1.0 - d)
        if step % 100 == 0:
            print(f"{tag} step {step}/{a.steps} loss {loss.item():.4f} {time.time() - t0:.0f}s", flush=True)
        if step not in eval_at:
            continue
        model.eval()
        raw = [p.detach().clone() for p in model.parameters()]
        for weights, values in (("raw", raw), ("ema", ema)):
            if values is None:
                continue
            with torch.no_grad():
                for p, v in zip(model.parameters(), values):
                    p.copy_(v)
            for w in [float(x) for x in a.guidance.split(",")]:
                gen = torch.Generator().manual_seed(0)
                images = torch.cat([fam.generate(model, TextCond.of(ptext[i:i + 100], pmask[i:i + 100]), gen,
                                                 guidance=w)[1].float().clamp(-1, 1)  # type: ignore[union-attr]
                                    for i in range(0, a.n, 100)])  # [n, 3, 32, 32]
                row = {**recipe, "step": step, "weights": weights, "guidance": w,
                       **score_images(scorer, images, attrs), **score_by_object_count(scorer, images, attrs),
                       "train_seconds": round(time.time() - t0)}
                print(json.dumps(row), flush=True)
                with a.out.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                shown = min(12, a.n)  # one sample per prompt, one prompt per row
                labelled_grid(to_pil(images[:shown]), prompts[:shown], per_row=1, scale=2, label_width=420).save(
                    a.out.with_name(f"{a.out.stem}-{tag}-{step}-{weights}-cfg{w:g}.png"))
        with torch.no_grad():
            for p, v in zip(model.parameters(), raw):
                p.copy_(v)


if __name__ == "__main__":
    main()
