"""Training data: a step-based, resumable stream of batches over WebDataset shards.

Order (a pure function of the seed and the dataset). The N samples are indexed once
(``training/tar_index.py``). The global sample stream is the concatenation over epochs
e = 0, 1, ... of a permutation of the N samples drawn from ``SeedSequence([seed, e])``.
Global step s consumes stream positions [s*G, (s+1)*G) with G = batch_size * world_size,
and rank r takes the contiguous slice [s*G + r*B, s*G + (r+1)*B). So every rank runs the
same (unbounded) number of steps whatever the shard sizes, rank slices are disjoint and
cover the global batch, and the whole state of the stream is ONE integer: the number of
global samples consumed, ``step * G``. Resuming at any world size with the same G (or any
offset, ``batches(start_sample=...)``) continues exactly where an uninterrupted run would.

Reads. A torch DataLoader runs a map-style dataset of steps (step k -> this rank's
collated batch); steps go to workers round-robin and come back in order, so the keys do
not depend on ``num_workers``. Each sample is one byte-range read of its tar members.

Safety and damage. Only known extensions are ever decoded (images: ``tar_format.IMAGE_EXTS`` via
PIL; latents: ``.npy`` via ``np.load(allow_pickle=False)``; txt; json is never read); any
other member (``.pkl``, ``.pth``, ...) is never read and counted as ``member_ignored:<ext>``.
Damaged tars and samples are counted by reason in ``ShardStream.skipped`` (never raised):
index-time damage when the stream is built, read/decode failures as batches are yielded.
A sample that fails to read is replaced by a deterministic draw from the same epoch, so the
batch keeps its size and resumes stay exact (the failure is a function of the bytes).
"""

from __future__ import annotations

import hashlib
import io
import itertools
import logging
import os
import signal
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

import numpy as np
import torch
from PIL import Image

from latentpipe.preprocessing.config import ConfigError
from latentpipe.preprocessing.pixels import to_unit
from latentpipe.preprocessing.tar_format import IMAGE_EXTS, read_ranges
from latentpipe.training.tar_index import SampleIndex, build_index, open_binary, resolve_shards

log = logging.getLogger("latentpipe.data")

MAX_REPLACEMENTS = 16  # consecutive unreadable draws before the stream gives up loudly
STATE_VERSION = 1


@dataclass
class DataConfig:
    """The ``data:`` section of a training config."""

    shards: str = ""  # a folder holding shard-*.tar, or a glob / brace pattern of tars
    kind: Literal["images", "latents"] = "images"
    batch_size: int = 32  # per rank
    num_workers: int = 1
    seed: int = 0
    image_size: int | None = None  # images: resize (shorter side) + centre-crop to this if set
    max_text_len: int = 77  # latents: pad/truncate per-token text embeddings to this

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.image_size is not None and self.image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {self.image_size}")
        if self.max_text_len < 1:
            raise ValueError(f"max_text_len must be >= 1, got {self.max_text_len}")


class DataChangedError(ConfigError):
    """A resume whose data stream would not continue the checkpoint's (the message says what differs)."""


class BadSample(Exception):
    """A sample that cannot be used; ``reason`` is its key in ``skipped``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def load_npy(data: bytes) -> np.ndarray:
    """A ``.npy`` payload as an array; never unpickles (object arrays are refused)."""
    arr = np.load(io.BytesIO(data), allow_pickle=False)
    if not isinstance(arr, np.ndarray):  # an .npz archive
        raise BadSample("decode_error:npy")
    return arr


def decode_image(data: bytes, size: int | None) -> np.ndarray:
    """Decode to RGB uint8 [H, W, 3]; with ``size``: shorter side to size, centre crop."""
    with Image.open(io.BytesIO(data)) as im:
        rgb = im.convert("RGB")
    if size is not None and rgb.size != (size, size):
        w, h = rgb.size
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        rgb = rgb.resize((nw, nh), Image.Resampling.BICUBIC)
        left, top = (nw - size) // 2, (nh - size) // 2
        rgb = rgb.crop((left, top, left + size, top + size))
    return np.asarray(rgb, dtype=np.uint8)


class SampleReader:
    """Reads and decodes samples by index, in whichever process it runs.

    File handles are opened lazily and per process (a forked DataLoader worker never
    shares a seek position with its parent).
    """

    def __init__(self, index: SampleIndex, cfg: DataConfig) -> None:
        self.index = index
        self.cfg = cfg
        self.ref: dict[str, tuple[int, ...]] = {}  # reference shapes, set by probe()
        self._files: dict[int, IO[bytes]] = {}
        self._pid = os.getpid()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_files": {}}

    def _file(self, shard: int) -> IO[bytes]:
        if self._pid != os.getpid():
            self._files, self._pid = {}, os.getpid()
        f = self._files.get(shard)
        if f is None:
            if len(self._files) >= 64:
                self._files.pop(next(iter(self._files))).close()
            f = self._files[shard] = open_binary(self.index.shards[shard])
        return f

    def key(self, i: int) -> str:
        return bytes(self.index.keys[i]).decode("utf-8")

    def read(self, i: int) -> dict[str, Any]:
        """Sample i decoded: key, caption, and image uint8 [H, W, 3] or the latent arrays."""
        ix = self.index
        ranges = list(zip(ix.offsets[i].tolist(), ix.sizes[i].tolist()))
        try:
            blobs = dict(zip(ix.fields, read_ranges(self._file(int(ix.shard[i])), ranges)))
        except OSError as e:
            self._files.pop(int(ix.shard[i]), None)
            raise BadSample("read_error") from e
        out: dict[str, Any] = {"__key__": self.key(i)}
        for name, data in blobs.items():
            label = IMAGE_EXTS[ix.image_ext[i]] if name == "image" else name
            try:
                if name == "txt":
                    out["caption"] = data.decode("utf-8").strip()
                elif name == "image":
                    out["image"] = decode_image(data, self.cfg.image_size)
                else:
                    out[name[:-4]] = load_npy(data)
            except BadSample:
                raise
            except Exception as e:  # PIL, numpy, utf-8: whatever the bytes break
                raise BadSample(f"decode_error:{label}") from e
        self._check(out)
        return out

    def _check(self, s: dict[str, Any]) -> None:
        """Shapes/dtypes against the reference sample; raises BadSample("shape_mismatch:...")."""
        shapes: dict[str, tuple[int, ...]] = {}
        if "image" in s:
            shapes["image"] = s["image"].shape
        else:
            lat, text = s["latent"], s["text"]
            if lat.ndim != 3 or lat.dtype.kind != "f":
                raise BadSample("shape_mismatch:latent")
            if text.ndim != 2 or text.dtype.kind != "f":
                raise BadSample("shape_mismatch:text")
            shapes["latent"], shapes["text_dim"] = lat.shape, (text.shape[1],)
            if "tokens" in s:
                if s["tokens"].ndim != 1 or s["tokens"].dtype.kind not in "iu":
                    raise BadSample("shape_mismatch:tokens")
                shapes["tokens"] = s["tokens"].shape
            if "pooled" in s:
                if s["pooled"].ndim != 1 or s["pooled"].dtype.kind != "f":
                    raise BadSample("shape_mismatch:pooled")
                shapes["pooled"] = s["pooled"].shape
        for k, v in shapes.items():
            if self.ref and self.ref.get(k) != v:
                raise BadSample(f"shape_mismatch:{k}")

    def probe(self, limit: int = 64) -> None:
        """Fix the reference shapes from the first decodable sample in index order."""
        reasons: Counter[str] = Counter()
        for i in range(min(limit, len(self.index.keys))):
            try:
                s = self.read(i)
            except BadSample as e:
                reasons[e.reason] += 1
                continue
            if "image" in s:
                self.ref = {"image": s["image"].shape}
            else:
                self.ref = {"latent": s["latent"].shape, "text_dim": (s["text"].shape[1],)}
                for k in ("tokens", "pooled"):
                    if k in s:
                        self.ref[k] = s[k].shape
            return
        raise ConfigError(f"data.shards: none of the first {limit} samples decodes: {dict(reasons)}")


def collate(samples: list[dict[str, Any]], max_text_len: int) -> dict[str, Any]:
    """Stack decoded samples into a batch: ``__key__`` and ``caption`` lists, then ``image`` [B, 3, H, W]
    float32 in [-1, 1], or ``latent`` as stored (e.g. [B, 2C, h, w]) (+ ``tokens`` [B, N] int64, ``pooled`` [B, D]) and
    ``text`` [B, T, D] float32 with ``text_mask`` [B, T] bool, zero-padded or cut to ``max_text_len``."""
    batch: dict[str, Any] = {"__key__": [s["__key__"] for s in samples],
                             "caption": [s["caption"] for s in samples]}
    if "image" in samples[0]:
        batch["image"] = torch.from_numpy(to_unit(np.stack([s["image"] for s in samples])))  # [B, 3, H, W]
        return batch
    batch["latent"] = torch.from_numpy(np.stack([s["latent"] for s in samples]).astype(np.float32))
    if "tokens" in samples[0]:
        batch["tokens"] = torch.from_numpy(np.stack([s["tokens"] for s in samples]).astype(np.int64))
    d = samples[0]["text"].shape[1]
    text = np.zeros((len(samples), max_text_len, d), np.float32)  # [B, T, D]
    mask = np.zeros((len(samples), max_text_len), np.bool_)  # [B, T]
    for j, s in enumerate(samples):
        n = min(len(s["text"]), max_text_len)
        text[j, :n] = s["text"][:n]
        mask[j, :n] = True
    batch["text"], batch["text_mask"] = torch.from_numpy(text), torch.from_numpy(mask)
    if "pooled" in samples[0]:
        batch["pooled"] = torch.from_numpy(np.stack([s["pooled"] for s in samples]).astype(np.float32))
    return batch


class StepBatches(torch.utils.data.Dataset[dict[str, Any]]):
    """Map-style dataset of steps: item k is this rank's batch for the k-th step from ``start``.

    Stream position q (0, 1, ...) holds sample ``perm_e[q % N]`` with e = q // N and
    ``perm_e`` the permutation drawn from ``SeedSequence([seed, e])``.
    """

    def __init__(self, reader: SampleReader, rank: int, world_size: int, start_sample: int) -> None:
        self.reader, self.rank, self.world_size, self.start = reader, rank, world_size, start_sample
        self.n = len(reader.index.keys)
        self._perms: dict[int, np.ndarray] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_perms": {}}

    def perm(self, epoch: int) -> np.ndarray:
        p = self._perms.get(epoch)
        if p is None:
            if len(self._perms) >= 2:
                self._perms.pop(min(self._perms))
            rng = np.random.default_rng(np.random.SeedSequence([self.reader.cfg.seed, epoch]))
            p = self._perms[epoch] = rng.permutation(self.n)
        return p

    def sample_at(self, q: int, skipped: Counter[str]) -> dict[str, Any]:
        """The decoded sample at stream position q (a deterministic stand-in if it is bad)."""
        epoch, j = divmod(q, self.n)
        i = int(self.perm(epoch)[j])
        for attempt in range(1, MAX_REPLACEMENTS + 1):
            try:
                return self.reader.read(i)
            except BadSample as e:
                skipped[e.reason] += 1
                log.warning("skipping sample %s (%s: %s)", self.reader.key(i), e.reason, e.__cause__)
                last = e
            seq = np.random.SeedSequence([self.reader.cfg.seed, epoch, j, attempt])
            i = int(np.random.default_rng(seq).integers(self.n))
        hint = ("images differ in size: set data.image_size" if last.reason == "shape_mismatch:image"
                else "the shards are badly damaged")
        raise RuntimeError(f"{MAX_REPLACEMENTS} unusable samples in a row (last: {last.reason}): {hint}") from last

    def __getitem__(self, k: int) -> dict[str, Any]:
        b = self.reader.cfg.batch_size
        first = self.start + k * b * self.world_size + self.rank * b
        skipped: Counter[str] = Counter()
        batch = collate([self.sample_at(q, skipped) for q in range(first, first + b)],
                        self.reader.cfg.max_text_len)
        batch["__skipped__"] = dict(skipped)
        return batch


class _Forever(torch.utils.data.Sampler[int]):
    def __iter__(self) -> Iterator[int]:
        return itertools.count()


class ShardStream:
    """This rank's infinite stream of batches (module docstring: order, state, damage).

    Attributes:
        num_samples: usable samples in the dataset (N).
        samples_per_step: the global batch G = batch_size * world_size.
        skipped: reason -> count of everything not used: tars, members, samples. Index-time
            problems are there from construction; read-time ones are added as batches are
            yielded (so the count is a function of the batches yielded).
        manifest: the shard folder's ``_manifest.json`` (e.g. the VAE scaling factor), or None.
        fingerprint: hash of the sample keys, shard names and each shard's content digest
            (``shard_digest``): changes when the data does.
    """

    def __init__(self, cfg: DataConfig, rank: int, world_size: int) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        paths, problems, self.manifest = resolve_shards(cfg.shards)
        index = build_index(paths, cfg.kind, problems)
        self.skipped: dict[str, int] = problems
        self.num_samples = len(index.keys)
        if self.num_samples == 0:
            raise ConfigError(f"data.shards: no usable {cfg.kind} samples in {cfg.shards} ({dict(problems)})")
        if problems:
            log.warning("data: %d samples in %d shards; not used: %s", self.num_samples, len(paths), dict(problems))
        self.samples_per_step = cfg.batch_size * world_size
        self._reader = SampleReader(index, cfg)
        self._reader.probe()
        h = hashlib.sha256(cfg.kind.encode())
        for p in paths:
            h.update(os.path.basename(p).encode() + b"\0" + shard_digest(p).encode() + b"\0")
        h.update(b"\0".join(index.keys.tolist()))
        self.fingerprint = h.hexdigest()[:16]

    def state_dict(self, step: int) -> dict[str, Any]:
        """The stream's whole state after ``step`` global steps (store it in the checkpoint)."""
        return {"version": STATE_VERSION, "samples_seen": step * self.samples_per_step,
                "seed": self.cfg.seed, "num_samples": self.num_samples, "fingerprint": self.fingerprint}

    def resume_position(self, state: dict[str, Any], micro_steps: int, allow_changed: bool = False) -> int:
        """The global sample position at which to continue a checkpoint's stream ``state``.

        ``micro_steps``: the micro-batch steps the checkpoint took (optimizer steps x grad_accum);
        an uninterrupted run would have read ``micro_steps * samples_per_step`` samples by then.
        Raises ``DataChangedError`` naming what differs (the data fingerprint, the seed, the
        sample-order version, or the global batch), unless ``allow_changed``: then a warning,
        and the stream continues at the checkpoint's position in the (new) order.
        """
        seen = int(state.get("samples_seen", -1))
        diffs = []
        if state.get("fingerprint") != self.fingerprint:
            diffs.append(f"data fingerprint {state.get('fingerprint')} ({state.get('num_samples')} samples) -> "
                         f"{self.fingerprint} ({self.num_samples} samples): shards added, removed or changed")
        if state.get("seed") != self.cfg.seed:
            diffs.append(f"data.seed {state.get('seed')} -> {self.cfg.seed}")
        if state.get("version") != STATE_VERSION:
            diffs.append(f"sample-order version {state.get('version')} -> {STATE_VERSION}")
        if seen != micro_steps * self.samples_per_step:
            diffs.append(f"sample order: {seen} samples read in {micro_steps} steps, this run's global batch "
                         f"{self.samples_per_step} would have read {micro_steps * self.samples_per_step}")
        if diffs and not allow_changed:
            raise DataChangedError("--resume on other data than the checkpoint's: " + "; ".join(diffs)
                                   + " (pass --resume-on-changed-data to continue anyway)")
        if diffs:
            log.warning("resuming on changed data (--resume-on-changed-data): %s", "; ".join(diffs))
        return max(seen, 0)

    def batches(self, start_step: int = 0, *, start_sample: int | None = None) -> Iterator[dict[str, Any]]:
        """This rank's batches for global steps start_step, start_step + 1, ... (infinite).

        ``start_sample`` (a global sample count) replaces ``start_step * samples_per_step``.
        """
        start = start_step * self.samples_per_step if start_sample is None else start_sample
        if start < 0:
            raise ValueError(f"start position must be >= 0, got {start}")
        steps = StepBatches(self._reader, self.rank, self.world_size, start)
        nw = self.cfg.num_workers
        loader = torch.utils.data.DataLoader(
            steps, batch_size=None, sampler=_Forever(), num_workers=nw,
            prefetch_factor=2 if nw else None, pin_memory=torch.cuda.is_available(), worker_init_fn=_ignore_sigterm,
            # Its own generator: creating the iterator must not draw from the global torch RNG,
            # or a resumed run's global randomness would be shifted against an uninterrupted one.
            generator=torch.Generator().manual_seed(self.cfg.seed))
        it = iter(loader)
        try:
            for batch in it:
                for reason, n in batch.pop("__skipped__").items():
                    self.skipped[reason] = self.skipped.get(reason, 0) + int(n)
                yield batch
        finally:
            del it  # shuts the workers down


def shard_digest(path: str) -> str:
    """A shard's content digest: the tar's size and mtime plus the sha256 of its ``.stats.json``
    (rewritten whenever the shard is), or without stats of the tar itself (streamed); a URL: its
    name only. A copy of the shards to a new place (new mtimes) counts as changed data."""
    if "://" in path:
        return ""
    tar = Path(path)
    st = tar.stat()
    stats = tar.with_name(tar.name[:-4] + ".stats.json") if tar.name.endswith(".tar") else None
    if stats is not None and stats.is_file():
        return f"{st.st_size}:{st.st_mtime_ns}:{hashlib.sha256(stats.read_bytes()).hexdigest()}"
    with open(tar, "rb") as f:
        return f"{st.st_size}:{st.st_mtime_ns}:{hashlib.file_digest(f, 'sha256').hexdigest()}"


def _ignore_sigterm(worker_id: int) -> None:
    """Loader workers ignore SIGTERM: a scheduler that signals every process of a job (SLURM's
    scancel and time limit, a shell's process group) would otherwise kill them under the rank,
    which must live on to checkpoint. They still end with their rank (PyTorch's watchdog)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
