"""Trainer-core benchmark: ZeRO memory per rank, steps/s, data wait, tracking-outage overhead.

    python benchmarks/train_core.py [--out benchmarks/train_core.json] [--steps 30]

1. Memory (2 ranks, torchrun, gloo/NCCL): the ~50M-parameter toy family (``hidden=2048,
   depth=12``) under ZeRO 0/1/2/3, in fp32 and bf16. After the second backward (gradients and
   optimizer state both live) every live tensor of the rank is walked once (storages
   de-duplicated) and classed as parameters (the module's, or its ZeRO-3 partitions), optimizer
   state (the inner optimizer's fp32 masters and Adam moments) or gradients+buffers (the
   rest). Measured per rank next to the ZeRO paper / DeepSpeed estimator formula, plus
   steps/s on a synthetic batch.
2. Data wait and steps/s of the real loop (``Trainer``: real image shards, real loader,
   ZeRO-2, 2 ranks), and the same run with the MLflow tracking server running vs stopped
   (a real ``mlflow server`` on 127.0.0.1, killed before the second run).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BIG = {"kind": "toy", "channels": 32, "hidden": int(os.environ.get("BENCH_HIDDEN", 2048)),
       "depth": int(os.environ.get("BENCH_DEPTH", 12))}  # ~50.5M parameters


# -- workers (run under torchrun) -------------------------------------------------------------


def _storages(objs: list[Any]) -> dict[int, int]:
    import torch

    out: dict[int, int] = {}
    for t in objs:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            st = t.untyped_storage()
            if st.nbytes():
                out[st.data_ptr()] = st.nbytes()
    return out


def _classify(engine: Any) -> dict[str, float]:
    """Bytes of this rank's live tensors: params / optimizer state / grads+buffers."""
    import torch

    gc.collect()
    live = _storages([o for o in gc.get_objects() if isinstance(o, torch.Tensor)])
    params: list[Any] = []
    for p in engine.module.parameters():
        params.append(p.ds_tensor if hasattr(p, "ds_tensor") else p.data)
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    optim: list[Any] = [q for g in inner.param_groups for q in g["params"]]
    for st in inner.state.values():
        optim += [v for v in st.values() if isinstance(v, torch.Tensor)]
    p_st, o_st = _storages(params), _storages(optim)
    o_st = {k: v for k, v in o_st.items() if k not in p_st}
    rest = {k: v for k, v in live.items() if k not in p_st and k not in o_st}
    mib = 2.0**20
    return {"params_mib": sum(p_st.values()) / mib, "optim_mib": sum(o_st.values()) / mib,
            "grads_other_mib": sum(rest.values()) / mib}


def _formula(stage: int, precision: str, n_params: int, world: int) -> float:
    """Model-state bytes per rank (MiB). Mixed precision: ZeRO paper, K=12 (fp32 master + Adam
    moments) with DeepSpeed's estimator for stage 2 (2 + 18/N: it counts 16- and 32-bit grads);
    fp32: params 4, grads 4, Adam 8 (+4 for the fp32 master copy DeepSpeed's ZeRO keeps)."""
    psi, n = float(n_params), world
    if precision == "bf16":
        table = {0: 2 * psi + 2 * psi + 12 * psi / n,  # DS's bf16 optimizer shards the fp32 state
                 1: 2 * psi + 2 * psi + 12 * psi / n, 2: 2 * psi + 18 * psi / n, 3: 16 * psi / n}
    else:
        table = {0: 16 * psi, 1: 4 * psi + 4 * psi + 12 * psi / n, 2: 4 * psi + 16 * psi / n, 3: 20 * psi / n}
    return table[stage] / 2.0**20


def worker_memory(out: Path, steps: int) -> None:
    import torch
    import torch.distributed as dist

    from latentpipe.training.config import TrainConfig
    from latentpipe.training.families import family_from_config
    from latentpipe.training.zero import build_engines, build_modules, setup_distributed

    info = setup_distributed("auto")
    rows = []
    for precision in ("fp32", "bf16"):
        for stage in (0, 1, 2, 3):
            cfg = TrainConfig(model=dict(BIG))
            cfg.data.batch_size = 8
            cfg.deepspeed.zero_stage = stage
            cfg.deepspeed.precision = precision  # type: ignore[assignment]
            cfg.deepspeed.extra = {"zero_optimization": {"reduce_bucket_size": 5e6, "allgather_bucket_size": 5e6,
                                                         "stage3_prefetch_bucket_size": 5e6}}
            family = family_from_config(cfg.model)
            engine = build_engines(build_modules(family, cfg, info.world_size), cfg, info.world_size)["model"]
            n_params = sum(int(getattr(p, "ds_numel", p.numel())) for p in engine.module.parameters())
            batch = {"image": (torch.rand(8, 3, 32, 32) * 2 - 1).to(info.device)}
            mem: dict[str, float] = {}
            times = []
            for i in range(2 + steps):
                t0 = time.perf_counter()
                loss, _ = family.loss("model", {"model": engine}, batch, i)
                engine.backward(loss)
                if i == 1:
                    mem = _classify(engine)
                engine.step()
                if i >= 2:
                    times.append(time.perf_counter() - t0)
            vals = torch.tensor([mem["params_mib"], mem["optim_mib"], mem["grads_other_mib"]], dtype=torch.float64)
            gathered = [torch.zeros_like(vals) for _ in range(info.world_size)]
            dist.all_gather(gathered, vals)
            per_rank = torch.stack(gathered).max(dim=0).values.tolist()  # the fullest rank
            rows.append({"precision": precision, "stage": stage, "params": n_params,
                         "params_mib": per_rank[0], "optim_mib": per_rank[1], "grads_other_mib": per_rank[2],
                         "total_mib": sum(per_rank), "formula_mib": _formula(stage, precision, n_params,
                                                                              info.world_size),
                         "steps_per_s": 1.0 / statistics.median(times)})
            if hasattr(engine, "destroy"):
                engine.destroy()
            del engine
            gc.collect()
            dist.barrier()
    if info.rank == 0:
        out.write_text(json.dumps(rows, indent=1))


def worker_train(out: Path, shards: str, workdir: str, uri: str, steps: int) -> None:
    from latentpipe.preprocessing.config import load_config
    from latentpipe.training.config import TrainConfig
    from latentpipe.training.engine import Trainer

    cfg = load_config(TrainConfig, ROOT / "configs/train_toy.yaml", [
        f"data.shards={shards}", f"workdir={workdir}", f"steps={steps}", "data.batch_size=8",
        "checkpoint.every_steps=0", "checkpoint.export=false", "eval_every=0", "sample_every=0",
        f"tracking.uri={uri}", "tracking.system_metrics=false", "tracking.http_timeout=2",
        *[f"model.{k}={v}" for k, v in BIG.items()]])
    trainer = Trainer(cfg)
    res = trainer.run()
    if trainer.di.rank == 0:
        skip = 2  # the first steps include FLOP counting and warm-up
        out.write_text(json.dumps({"step_times": res.step_times[skip:], "data_waits": res.data_waits[skip:]}))


# -- orchestration -----------------------------------------------------------------------------


def _torchrun(args: list[str], timeout: float = 3600) -> None:
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"),
           "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", __file__, *args]
    subprocess.run(cmd, check=True, env=env, timeout=timeout, cwd=ROOT)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _mlflow_server(tmp: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", f"sqlite:///{tmp / 'server.db'}",
                             "--artifacts-destination", str(tmp / "server-artifacts"), "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    uri = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            with urllib.request.urlopen(uri + "/health", timeout=2) as r:
                if r.status == 200:
                    return proc, uri
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("mlflow server did not come up")


def _stop_server(proc: subprocess.Popen[bytes], uri: str) -> None:
    """Stop the server and its worker processes, and make sure nothing answers at ``uri`` any more."""
    import psutil

    try:
        kids = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        kids = []
    proc.terminate()
    proc.wait(timeout=30)
    for k in kids:
        with contextlib.suppress(psutil.NoSuchProcess):
            k.kill()
    psutil.wait_procs(kids, timeout=30)
    try:
        urllib.request.urlopen(uri + "/health", timeout=2)
    except OSError:
        return
    raise RuntimeError(f"{uri} still answers after the server was stopped")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("train_core.json"), help="results as JSON")
    ap.add_argument("--steps", type=int, default=30, help="steps of each real-loop run")
    ap.add_argument("--repeats", type=int, default=2, help="alternating server-up / server-down run pairs")
    ap.add_argument("--skip-memory", action="store_true", help="only the real-loop runs")
    ap.add_argument("--worker", choices=["memory", "train"], help=argparse.SUPPRESS)
    ap.add_argument("--shards", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    ap.add_argument("--uri", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker == "memory":
        worker_memory(args.out, steps=3)
        return 0
    if args.worker == "train":
        worker_train(args.out, args.shards, args.workdir, args.uri, args.steps)
        return 0

    sys.path.insert(0, str(ROOT))
    from tests.shards import make_image_shards

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        mem: list[dict[str, Any]] = []
        if not args.skip_memory:
            _torchrun(["--worker", "memory", "--out", str(tmp / "mem.json")])
            mem = json.loads((tmp / "mem.json").read_text())
        shards = make_image_shards(tmp / "data", 4, 64)
        runs: dict[str, list[dict[str, list[float]]]] = {"up": [], "down": []}
        for i in range(args.repeats):  # alternate, so drifting machine load hits both alike
            for state in ("up", "down"):
                server, uri = _mlflow_server(tmp / f"server{i}")
                if state == "down":  # a tracking server that was there and went away
                    _stop_server(server, uri)
                try:
                    out = tmp / f"{state}{i}.json"
                    _torchrun(["--worker", "train", "--out", str(out), "--shards", str(shards),
                               "--workdir", str(tmp / f"{state}{i}"), "--uri", uri, "--steps", str(args.steps)])
                    runs[state].append(json.loads(out.read_text()))
                finally:
                    if server.poll() is None:
                        _stop_server(server, uri)
        up = {k: [v for r in runs["up"] for v in r[k]] for k in ("step_times", "data_waits")}
        down = {k: [v for r in runs["down"] for v in r[k]] for k in ("step_times", "data_waits")}

    def summary(r: dict[str, list[float]]) -> dict[str, float]:
        t = statistics.median(r["step_times"])
        return {"median_step_s": t, "steps_per_s": 1.0 / t,
                "data_wait_frac": sum(r["data_waits"]) / sum(r["step_times"])}

    result: dict[str, Any] = {"memory": mem, "server_up": summary(up), "server_down": summary(down)}
    args.out.write_text(json.dumps(result, indent=1))
    s0 = {(r["precision"], r["stage"]): r for r in mem}
    if mem:
        print("| precision | ZeRO | params MiB | optim MiB | grads+buffers MiB | total MiB | formula MiB | steps/s |")
        print("|---|---|---|---|---|---|---|---|")
    for r in mem:
        print(f"| {r['precision']} | {r['stage']} | {r['params_mib']:.0f} | {r['optim_mib']:.0f} | "
              f"{r['grads_other_mib']:.0f} | {r['total_mib']:.0f} | {r['formula_mib']:.0f} | {r['steps_per_s']:.2f} |")
    for prec in ("fp32", "bf16"):
        if (prec, 2) in s0:
            a, b = s0[(prec, 2)], s0[(prec, 0)]
            ratio = (a["optim_mib"] + a["grads_other_mib"]) / (b["optim_mib"] + b["grads_other_mib"])
            print(f"\n{prec}: ZeRO-2 / ZeRO-0 optimizer+gradient memory per rank = {ratio:.3f}")
    u, dn = result["server_up"], result["server_down"]
    print(f"\nreal loop (ZeRO-2, fp32, 2 ranks, toy {BIG}): {u['steps_per_s']:.3f} steps/s, "
          f"data wait {100 * u['data_wait_frac']:.2f}% of step time")
    print(f"tracking server stopped vs running: median step {dn['median_step_s']:.3f}s vs {u['median_step_s']:.3f}s "
          f"({100 * (dn['median_step_s'] / u['median_step_s'] - 1):+.1f}%; {args.repeats} alternating run pairs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
