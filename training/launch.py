"""One ``train(config)`` function and the launchers that run it on every rank.

- ``local``: in this process, one rank (no launcher needed).
- ``torchrun``: ``python -m torch.distributed.run`` with ``--nproc-per-node`` (+ ``--nnodes``,
  ``--node-rank``, ``--master-addr``, ``--master-port`` for a static multi-node rendezvous).
- ``deepspeed``: the DeepSpeed launcher (``--hostfile`` for pdsh/ssh multi-node, or
  ``--no_ssh`` with ``--node_rank``/``--master_addr`` when a scheduler starts one launcher per node).
- ``ray``: Ray Train's ``TorchTrainer`` (``RAY_ADDRESS`` joins a cluster; none starts a local one).

Every rank reads the same resolved config, written once to ``<workdir>/train_config.yaml``.
Ranks find each other through the environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from preprocessing.config import load_config, save_config
from training.config import TrainConfig

log = logging.getLogger("latentpipe.train")
Launcher = Literal["local", "torchrun", "deepspeed", "ray"]
CONFIG_NAME = "train_config.yaml"


@dataclass
class LaunchOptions:
    launcher: Launcher = "local"
    nproc: int = 1  # ranks per node (Ray: workers in all)
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None
    hostfile: str | None = None  # deepspeed launcher
    use_gpu: bool | None = None  # Ray: one GPU per worker (None: when the driver sees CUDA)


def train(cfg: TrainConfig) -> Any:
    """Train on this rank (rank and world from the environment); returns a ``TrainResult``."""
    from training.engine import train_loop

    return train_loop(cfg)


def write_config(cfg: TrainConfig) -> Path:
    return save_config(cfg, Path(cfg.workdir) / CONFIG_NAME)


def _worker_cmd(config_path: Path) -> list[str]:
    return ["-m", "training.launch", str(config_path.resolve())]


def torchrun_command(config_path: Path, opts: LaunchOptions) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={opts.nproc}",
           f"--nnodes={opts.nnodes}", f"--node-rank={opts.node_rank}"]
    if opts.nnodes == 1 and opts.master_addr is None:
        cmd.append("--standalone")
    else:
        cmd += [f"--master-addr={opts.master_addr or '127.0.0.1'}", f"--master-port={opts.master_port or 29500}"]
    return cmd + _worker_cmd(config_path)


def deepspeed_command(config_path: Path, opts: LaunchOptions) -> list[str]:
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", f"--num_gpus={opts.nproc}"]
    if opts.hostfile:
        cmd += [f"--hostfile={opts.hostfile}", f"--num_nodes={opts.nnodes}"]
    elif opts.nnodes > 1:
        cmd += ["--no_ssh", f"--num_nodes={opts.nnodes}", f"--node_rank={opts.node_rank}"]
    if opts.master_addr:
        cmd.append(f"--master_addr={opts.master_addr}")
    if opts.master_port:
        cmd.append(f"--master_port={opts.master_port}")
    return cmd + ["--module", "training.launch", str(config_path.resolve())]


def _rank_processes(pid: int) -> list[Any]:
    """The training ranks among ``pid``'s descendants: processes with LOCAL_RANK in their
    environment whose parent has none (data-loader workers are forks of a rank: same env)."""
    import psutil

    def is_rank(p: Any) -> bool:
        try:
            return "LOCAL_RANK" in p.environ()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            return False

    try:
        procs = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    ranks = []
    for p in procs:
        try:
            parent = p.parent()
        except psutil.NoSuchProcess:
            continue
        if is_rank(p) and (parent is None or not is_rank(parent)):
            ranks.append(p)
    return ranks


def _run_forwarding_sigterm(cmd: list[str]) -> int:
    """Run a launcher; a SIGTERM to us goes straight to the rank processes (they checkpoint and
    exit 0, so the launcher exits 0 too), not to the launcher (torchrun would kill them after
    its grace period and exit non-zero) nor to data-loader workers (the rank would crash)."""
    import psutil

    proc = subprocess.Popen(cmd)

    def forward(signum: int, frame: Any) -> None:
        targets = _rank_processes(proc.pid)
        if not targets:  # no rank started yet: the launcher itself stops
            with contextlib.suppress(psutil.NoSuchProcess):
                targets = [psutil.Process(proc.pid)]
        for p in targets:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(signal.SIGTERM)

    old = signal.signal(signal.SIGTERM, forward)
    try:
        return proc.wait()
    finally:
        signal.signal(signal.SIGTERM, old)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _ray_worker(config: dict[str, Any]) -> None:
    cfg = load_config(TrainConfig, config["config_path"])
    train(cfg)


def launch_ray(cfg: TrainConfig, config_path: Path, opts: LaunchOptions) -> int:
    import ray
    import torch
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    use_gpu = torch.cuda.is_available() if opts.use_gpu is None else opts.use_gpu
    backend = cfg.deepspeed.backend if cfg.deepspeed.backend != "auto" else ("nccl" if use_gpu else "gloo")
    started = False
    if not ray.is_initialized():
        env = {k: os.environ[k] for k in ("DS_ACCELERATOR", "HF_HUB_OFFLINE", "MLFLOW_TRACKING_URI",
                                           "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING") if k in os.environ}
        ray.init(address=os.environ.get("RAY_ADDRESS"), runtime_env={"env_vars": env} if env else None)
        started = True
    try:
        trainer = TorchTrainer(
            _ray_worker, train_loop_config={"config_path": str(config_path.resolve())},
            scaling_config=ScalingConfig(num_workers=opts.nproc, use_gpu=use_gpu),
            torch_config=TorchConfig(backend=backend),
            run_config=RunConfig(name="latentpipe-train", storage_path=str((Path(cfg.workdir) / "ray").resolve()),
                                 failure_config=FailureConfig(max_failures=0)))
        trainer.fit()
    finally:
        if started:
            ray.shutdown()
    return 0


def launch(cfg: TrainConfig, opts: LaunchOptions) -> int:
    """Run ``train`` on every rank with the chosen launcher; returns the exit code."""
    if opts.nproc < 1 or opts.nnodes < 1:
        raise ValueError("--nproc and --nnodes must be >= 1")
    if opts.launcher == "local":
        if opts.nproc != 1 or opts.nnodes != 1:
            raise ValueError("the local launcher runs one rank: use --launcher torchrun|deepspeed|ray for more")
        train(cfg)
        return 0
    path = write_config(cfg)
    # torchrun's own default (one OpenMP thread per rank when it starts several), set here so it
    # does not print its banner about choosing it.
    if opts.nproc > 1:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    if opts.launcher == "torchrun":
        return _run_forwarding_sigterm(torchrun_command(path, opts))
    if opts.launcher == "deepspeed":
        return _run_forwarding_sigterm(deepspeed_command(path, opts))
    if opts.launcher == "ray":
        return launch_ray(cfg, path, opts)
    raise ValueError(f"unknown launcher {opts.launcher!r}")


def main(argv: list[str] | None = None) -> int:
    """Worker entry: ``python -m training.launch CONFIG.yaml`` (``--local_rank`` from deepspeed is ignored)."""
    args = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("--local_rank")]
    if len(args) != 1:
        print("usage: python -m training.launch CONFIG.yaml", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s rank" + os.environ.get("RANK", "0")
                        + " %(name)s: %(message)s")
    train(load_config(TrainConfig, args[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
