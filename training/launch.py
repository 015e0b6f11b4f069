"""One ``train(config)`` function and the launchers that run it on every rank.

- ``local``: in this process, one rank (no launcher needed).
- ``torchrun``: ``python -m torch.distributed.run`` with ``--nproc-per-node`` (+ ``--nnodes``,
  ``--node-rank``, ``--master-addr``, ``--master-port`` for a static multi-node rendezvous).
- ``deepspeed``: the DeepSpeed launcher (``--hostfile`` for pdsh/ssh multi-node, or
  ``--no_ssh`` with ``--node_rank``/``--master_addr`` when a scheduler starts one launcher per node).
- ``ray``: Ray Train's ``TorchTrainer`` (``RAY_ADDRESS`` joins a cluster; none starts a local one).

Every rank reads the same resolved config, written once to ``<workdir>/train_config.yaml``.
Ranks find each other through the environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

Single-node runs (``--nnodes 1``, no ``--master-addr``/``--hostfile``) listen on 127.0.0.1 only: this
process hosts the one rendezvous store (a ``TCPStore`` on a socket it bound to loopback) that
torchrun's agent and every rank join as clients, and gloo/NCCL use the loopback interface.
Ranks and launcher agents die with this process (``latentpipe.training.orphans``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from latentpipe.preprocessing.config import load_config, save_config
from latentpipe.preprocessing.local_ray import init_ray, is_local
from latentpipe.training.config import TrainConfig
from latentpipe.training.orphans import die_with_parent, guard_rank, launcher_env, remove_stale_buffers

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
    from latentpipe.training.engine import train_loop

    return train_loop(cfg)


def write_config(cfg: TrainConfig) -> Path:
    return save_config(cfg, Path(cfg.workdir) / CONFIG_NAME)


STORE_ENV = "LATENTPIPE_STORE"  # "127.0.0.1:PORT": the launcher's rendezvous store, for single-node ranks


def single_node(opts: LaunchOptions) -> bool:
    """A single-machine run: every rank on this host, every port on loopback."""
    return opts.nnodes == 1 and opts.master_addr is None and opts.hostfile is None


@contextlib.contextmanager
def loopback_store() -> Iterator[int]:
    """Host a ``TCPStore`` on a socket bound to 127.0.0.1 (no port race: it is bound before use);
    yields its port. Torch's own stores listen on every interface, so ranks join this one instead."""
    import torch.distributed as dist

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
        sock.listen(256)
        port = sock.getsockname()[1]
        store = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False, multi_tenant=True,
                              master_listen_fd=sock.fileno())
    except BaseException:
        sock.close()
        raise
    sock.detach()  # the store owns the listening socket now and closes it itself
    try:
        yield port
    finally:
        del store


def _worker_cmd(config_path: Path) -> list[str]:
    return ["-m", "latentpipe.training.launch", str(config_path.resolve())]


def torchrun_command(config_path: Path, opts: LaunchOptions, store_port: int | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={opts.nproc}",
           f"--nnodes={opts.nnodes}", f"--node-rank={opts.node_rank}"]
    if store_port is not None:  # single node: rendezvous in our loopback store, as its client
        cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{store_port}", "--rdzv-conf=is_host=false",
                f"--rdzv-id={uuid.uuid4().hex}", "--local-addr=127.0.0.1"]
    elif opts.nnodes == 1 and opts.master_addr is None:
        cmd.append("--standalone")
    else:
        cmd += [f"--master-addr={opts.master_addr or '127.0.0.1'}", f"--master-port={opts.master_port or 29500}"]
    return cmd + _worker_cmd(config_path)


def deepspeed_command(config_path: Path, opts: LaunchOptions, store_port: int | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", f"--num_gpus={opts.nproc}"]
    if opts.hostfile:
        cmd += [f"--hostfile={opts.hostfile}", f"--num_nodes={opts.nnodes}"]
    elif opts.nnodes > 1:
        cmd += ["--no_ssh", f"--num_nodes={opts.nnodes}", f"--node_rank={opts.node_rank}"]
    if store_port is not None:
        cmd += ["--master_addr=127.0.0.1", f"--master_port={store_port}"]
    if opts.master_addr:
        cmd.append(f"--master_addr={opts.master_addr}")
    if opts.master_port:
        cmd.append(f"--master_port={opts.master_port}")
    return cmd + ["--module", "latentpipe.training.launch", str(config_path.resolve())]


def rank_env(store_port: int | None) -> dict[str, str]:
    """What the ranks of a run started here need in their environment (on top of ours)."""
    env = launcher_env()
    if store_port is not None:
        env[STORE_ENV] = f"127.0.0.1:{store_port}"
        env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"  # torchrun's agent would host its own store on *
        for key in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
            env.setdefault(key, os.environ.get(key, "lo"))
    return env


def _join_launcher_store() -> None:
    """In a rank of a single-node run: use the launcher's loopback store as the process-group store
    (torch's env:// "agent store" mode: every rank a client, no rank listens)."""
    addr = os.environ.get(STORE_ENV)
    if addr:
        host, port = addr.rsplit(":", 1)
        os.environ.update(MASTER_ADDR=host, MASTER_PORT=port, TORCHELASTIC_USE_AGENT_STORE="True")


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


INHERITED_RANK_VARS = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                       "ROLE_WORLD_SIZE")


def _run_forwarding_sigterm(cmd: list[str], env: dict[str, str]) -> int:
    """Run a launcher; a SIGTERM to us goes straight to the rank processes (they checkpoint and
    exit 0, so the launcher exits 0 too), not to the launcher (torchrun would kill them after
    its grace period and exit non-zero) nor to data-loader workers (the rank would crash)."""
    import psutil

    # A launcher starts fresh ranks: rank identities inherited from an enclosing job (or left in
    # this process by an in-process run) must not reach it, or its agent would look like a rank.
    base = {k: v for k, v in os.environ.items() if k not in INHERITED_RANK_VARS}
    proc = subprocess.Popen(cmd, env={**base, **env}, preexec_fn=die_with_parent)  # noqa: PLW1509

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
    # The launcher's environment for its ranks, also when Ray was started by someone else (whose
    # runtime_env is not ours).
    os.environ.update(config["env"])
    guard_rank()
    if os.environ.get(STORE_ENV):  # a single-machine run: no process group yet, join the driver's store
        import torch
        from ray import train as ray_train

        ctx = ray_train.get_context()
        # A GPU worker of a plain DataParallelTrainer sees only its own GPU: device 0 in this process.
        local = ctx.get_local_rank() if torch.cuda.device_count() != 1 else 0
        os.environ.update(RANK=str(ctx.get_world_rank()), WORLD_SIZE=str(ctx.get_world_size()),
                          LOCAL_RANK=str(local), LOCAL_WORLD_SIZE=str(ctx.get_local_world_size()))
        _join_launcher_store()
    cfg = load_config(TrainConfig, config["config_path"])
    train(cfg)


def launch_ray(cfg: TrainConfig, config_path: Path, opts: LaunchOptions) -> int:
    """Ray Train workers as ranks. On a new local cluster (no ``RAY_ADDRESS``) the ranks join a store
    this driver hosts on 127.0.0.1 (Ray Train's own rank-0 store listens on every interface), so the
    trainer is a plain ``DataParallelTrainer`` that leaves the process group to us; on a cluster,
    ``TorchTrainer`` sets it up."""
    import ray
    import torch
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    # The plain trainer TorchTrainer derives from, in whichever Ray Train API version is active (V1/V2).
    data_parallel: Any = next(c for c in TorchTrainer.__mro__ if c.__name__ == "DataParallelTrainer")

    use_gpu = torch.cuda.is_available() if opts.use_gpu is None else opts.use_gpu
    backend = cfg.deepspeed.backend if cfg.deepspeed.backend != "auto" else ("nccl" if use_gpu else "gloo")
    env = {k: os.environ[k] for k in ("DS_ACCELERATOR", "HF_HUB_OFFLINE", "MLFLOW_TRACKING_URI",
                                       "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING") if k in os.environ}
    local = is_local(None)
    with loopback_store() if local else contextlib.nullcontext() as port:
        env.update(rank_env(port))
        started = init_ray(None, runtime_env={"env_vars": env})
        try:
            common: dict[str, Any] = {
                "train_loop_config": {"config_path": str(config_path.resolve()), "env": env},
                "scaling_config": ScalingConfig(num_workers=opts.nproc, use_gpu=use_gpu),
                "run_config": RunConfig(name="latentpipe-train", storage_path=str((Path(cfg.workdir) / "ray").resolve()),
                                        failure_config=FailureConfig(max_failures=0))}
            trainer = (data_parallel(_ray_worker, **common) if local
                       else TorchTrainer(_ray_worker, torch_config=TorchConfig(backend=backend), **common))
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
    if single_node(opts):  # what SIGKILLed ranks of earlier runs on this machine left in /dev/shm
        remove_stale_buffers()
    # torchrun's own default (one OpenMP thread per rank when it starts several), set here so it
    # does not print its banner about choosing it.
    if opts.nproc > 1:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    if opts.launcher in ("torchrun", "deepspeed"):
        command = torchrun_command if opts.launcher == "torchrun" else deepspeed_command
        if not single_node(opts):  # multi-node: the addresses the user gave
            return _run_forwarding_sigterm(command(path, opts), rank_env(None))
        with loopback_store() as port:
            return _run_forwarding_sigterm(command(path, opts, port), rank_env(port))
    if opts.launcher == "ray":
        return launch_ray(cfg, path, opts)
    raise ValueError(f"unknown launcher {opts.launcher!r}")


def main(argv: list[str] | None = None) -> int:
    """Worker entry: ``python -m latentpipe.training.launch CONFIG.yaml`` (``--local_rank`` from deepspeed is ignored)."""
    args = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("--local_rank")]
    if len(args) != 1:
        print("usage: python -m latentpipe.training.launch CONFIG.yaml", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s rank" + os.environ.get("RANK", "0")
                        + " %(name)s: %(message)s")
    guard_rank()
    _join_launcher_store()
    train(load_config(TrainConfig, args[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
