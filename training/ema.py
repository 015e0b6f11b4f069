"""EMA of the primary module's weights, sharded exactly like DeepSpeed's fp32 master weights.

w_ema <- d_n * w_ema + (1 - d_n) * w after each optimizer step (Polyak & Juditsky 1992;
the usual diffusion-model EMA), with d_n = decay, or with a warm-up
d_n = min(decay, 1 - (1 + n) ** -warmup_power) at the n-th update (the power-function EMA
warm-up of diffusers' ``EMAModel``), so the average of a short run is not dominated by its
first weights. A full fp32 EMA on every rank costs 4 bytes/param per rank,
more than ZeRO-2's whole sharded optimizer state at 8+ ranks, so each rank keeps the EMA of
the fp32 master fragment it owns, and updates it in place from that fragment (no traffic):

- ZeRO-1/2 and DeepSpeed's bf16 optimizer: each parameter's ``_hp_mapping`` names the slice
  [start, start+numel) of the flattened parameter that lies in this rank's flat fp32
  partition, and ``hp_fragment`` is a view of it.
- ZeRO-3: each parameter's partition ``ds_tensor`` (rank r holds [r*P, (r+1)*P), padded)
  has its fp32 copy at ``grad_position`` in the optimizer's ``fp32_partitioned_groups_flat``.
- ZeRO-0 (no fp32 partitions exist): rank r keeps the slice [r*P, (r+1)*P) of each
  replicated parameter, P = ceil(numel / world), read from its fp32 master: the parameter
  itself in fp32; in bf16/fp16 its copy in DeepSpeed's replicated ``fp32_groups`` (or the
  fused wrapper's ``fp32_groups_flat``).

Checkpoints store each rank's fragments by parameter name and offset, so they reload at
any world size and ZeRO stage (a rank reads the overlapping pieces of every stored file).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from latentpipe.training.safe_load import CheckpointFileError

EMA_FILE = "rank-{rank:05d}.safetensors"


@dataclass
class Fragment:
    """This rank's piece [start, start + numel) of a flattened parameter of ``full_numel`` elements."""

    name: str
    start: int
    numel: int
    full_numel: int
    shape: tuple[int, ...]
    source: torch.Tensor  # 1-D view of the master values this EMA follows ([numel])


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def master_fragments(engine: Any) -> tuple[str, list[Fragment]]:
    """(mode, fragments) for every trainable parameter of ``engine.module``, in module order.

    ``mode`` is "zero3", "hp" (ZeRO-1/2, bf16 optimizer) or "replicated" (fallback).
    Fragments with ``numel == 0`` are parameters this rank owns no piece of.
    """
    module: nn.Module = engine.module
    named: list[tuple[str, Any]] = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    rank, world = _rank_world()
    opt = getattr(engine, "optimizer", None)
    out: list[Fragment] = []
    if named and hasattr(named[0][1], "ds_id"):
        if getattr(opt, "swap_optimizer", False):
            raise NotImplementedError("EMA with NVMe optimizer offload is not supported")
        for name, p in named:
            group, offset, count = opt.grad_position[opt.get_param_id(p)]  # type: ignore[union-attr]
            part = int(p.ds_tensor.ds_numel)
            r = dist.get_rank(group=p.ds_process_group) if dist.is_initialized() else 0
            start = min(r * part, p.ds_numel)
            valid = max(0, min(part, p.ds_numel - start))
            flat = opt.fp32_partitioned_groups_flat[group]  # type: ignore[union-attr]
            src = flat.narrow(0, offset, count)[:valid]
            out.append(Fragment(name, start, valid, int(p.ds_numel), tuple(p.ds_shape), src))
        return "zero3", out
    if named and hasattr(named[0][1], "_hp_mapping"):
        for name, p in named:
            hm = p._hp_mapping
            if hm is None:
                out.append(Fragment(name, 0, 0, p.numel(), tuple(p.shape), torch.empty(0)))
                continue
            addr = hm.lp_fragment_address
            src = hm.hp_fragment.view(-1)
            out.append(Fragment(name, int(addr.start), int(addr.numel), p.numel(), tuple(p.shape), src))
        return "hp", out
    masters = {id(p): p.data.view(-1) for _, p in named}
    # bf16/fp16 at ZeRO-0: DeepSpeed's fp16 optimizers keep the fp32 masters per group, as one flat
    # tensor (fused: ``fp32_groups_flat``) or one tensor per parameter (``fp32_groups``), in order.
    for fp32, group in zip(getattr(opt, "fp32_groups_flat", None) or getattr(opt, "fp32_groups", []),
                           getattr(opt, "fp16_groups", [])):
        pieces = fp32.detach().split([p.numel() for p in group]) if isinstance(fp32, torch.Tensor) else fp32
        for p, master in zip(group, pieces, strict=True):
            masters[id(p)] = master.detach().view(-1)
    for name, p in named:
        n = p.numel()
        part = math.ceil(n / world)
        start = min(rank * part, n)
        valid = max(0, min(part, n - start))
        out.append(Fragment(name, start, valid, n, tuple(p.shape), masters[id(p)].narrow(0, start, valid)))
    return "replicated", out


def _open(path: Path) -> Any:
    """``safe_open`` with a one-line error naming the file when it is not a safetensors file."""
    try:
        return safe_open(str(path), framework="pt")
    except Exception as e:  # SafetensorError (header), OSError
        raise CheckpointFileError(f"{path}: not a readable safetensors file ({str(e).strip()[:120]})") from None


def _fragments(path: Path, fh: Any) -> dict[str, Any]:
    try:
        stored = json.loads((fh.metadata() or {}).get("fragments", "{}"))
    except ValueError:
        stored = None
    if not isinstance(stored, dict):
        raise CheckpointFileError(f"{path}: EMA fragment metadata is not a JSON object")
    return stored


class ShardedEMA:
    """This rank's shard of the EMA of ``engine``'s trainable weights (module docstring)."""

    def __init__(self, engine: Any, decay: float, every: int = 1, warmup_power: float = 0.0) -> None:
        self.engine = engine
        self.decay = decay
        self.every = every
        self.warmup_power = warmup_power
        self.updates = 0  # optimizer steps averaged in (counting from start())
        self.started = False
        self.mode, frags = master_fragments(engine)
        self.meta = {f.name: (f.start, f.numel, f.full_numel, f.shape) for f in frags}
        self.shadow: dict[str, torch.Tensor] = {}
        self._frags: list[Fragment] | None = None

    def _sources(self, refresh: bool = False) -> list[Fragment]:
        """The master fragments, read once and cached for ``update()``; ``start()`` and ``load()``
        re-read them (DeepSpeed may rebind its flat partitions when it loads a checkpoint)."""
        if refresh or self._frags is None:
            mode, frags = master_fragments(self.engine)
            assert mode == self.mode
            self._frags = frags
        return self._frags

    def local_numel(self) -> int:
        return sum(t.numel() for t in self.shadow.values())

    @torch.no_grad()
    def start(self) -> None:
        """Begin averaging: the EMA becomes a copy of the current fp32 master fragments."""
        self.shadow = {f.name: f.source.detach().float().clone() for f in self._sources(refresh=True)}
        self.started = True
        self.updates = 0

    def decay_at(self, n: int) -> float:
        """The decay of the n-th update (n = 0 is the first after ``start()``)."""
        if self.warmup_power <= 0:
            return self.decay
        return min(self.decay, 1.0 - (1.0 + n) ** -self.warmup_power)

    @torch.no_grad()
    def update(self) -> None:
        """One EMA step with weight ``decay_at(updates) ** every`` (call after every ``every`` optimizer steps)."""
        if not self.started:
            raise RuntimeError("EMA.update() before start()")
        weight = 1.0 - self.decay_at(self.updates) ** self.every
        emas, srcs = [], []
        for f in self._sources():
            if f.numel == 0:
                continue
            emas.append(self.shadow[f.name])
            srcs.append(f.source if f.source.dtype == torch.float32 else f.source.float())
        if emas:
            torch._foreach_lerp_(emas, srcs, weight)
        self.updates += 1

    # -- checkpoints -------------------------------------------------------------------------

    def save(self, folder: Path) -> None:
        """Write this rank's fragments to ``folder/rank-R.safetensors`` (keys: parameter names)."""
        rank, world = _rank_world()
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {n: t.detach().cpu().contiguous() for n, t in self.shadow.items() if t.numel()}
        frags = {n: [s, k, full] for n, (s, k, full, _) in self.meta.items() if k}
        meta = {"fragments": json.dumps(frags), "world_size": str(world), "mode": self.mode}
        save_file(tensors, str(folder / EMA_FILE.format(rank=rank)), metadata=meta)

    @torch.no_grad()
    def load(self, folder: Path) -> None:
        """Fill this rank's fragments from the pieces stored by any number of ranks in ``folder``."""
        files = sorted(folder.glob("rank-*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no EMA shards in {folder}")
        shadow = {f.name: torch.full((f.numel,), float("nan"), dtype=torch.float32)
                  for f in self._sources(refresh=True)}
        for path in files:
            with _open(path) as fh:
                stored = _fragments(path, fh)
                for name, (s0, k0, full) in stored.items():
                    if name not in self.meta:
                        raise ValueError(f"{path}: EMA parameter {name!r} is not in the model")
                    start, numel, my_full, _ = self.meta[name]
                    if full != my_full:
                        raise ValueError(f"{path}: EMA parameter {name!r} has {full} elements, model {my_full}")
                    lo, hi = max(start, s0), min(start + numel, s0 + k0)
                    if lo < hi:
                        shadow[name][lo - start:hi - start] = fh.get_slice(name)[lo - s0:hi - s0]
        for name, t in shadow.items():
            if torch.isnan(t).any():
                raise ValueError(f"EMA checkpoint in {folder} does not cover (all of) {name!r}")
        device = {f.name: f.source.device for f in self._sources()}
        self.shadow = {n: t.to(device[n]) for n, t in shadow.items()}
        self.started = True

    # -- consolidation -------------------------------------------------------------------------

    @torch.no_grad()
    def full_state(self, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Collective: the full fp32 EMA tensors on rank 0 ({} on other ranks).

        Each rank writes its disjoint fragment into a zero buffer; a sum-reduce to rank 0
        assembles the parameter (one parameter at a time, so peak memory is one parameter).
        """
        rank, world = _rank_world()
        out: dict[str, torch.Tensor] = {}
        for name, (start, numel, full, shape) in self.meta.items():
            buf = torch.zeros(full, dtype=torch.float32, device=device)
            if numel:
                buf[start:start + numel] = self.shadow[name].to(device)
            if world > 1:
                dist.reduce(buf, dst=0)
            if rank == 0:
                out[name] = buf.view(shape).cpu()
        return out

    def state(self) -> dict[str, Any]:
        return {"started": self.started, "updates": self.updates, "decay": self.decay,
                "every": self.every, "warmup_power": self.warmup_power, "mode": self.mode}


__all__ = ["EMA_FILE", "Fragment", "ShardedEMA", "master_fragments"]
