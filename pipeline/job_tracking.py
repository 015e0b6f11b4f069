"""One MLflow run per ``shard`` and ``encode`` job, beside the training runs.

On by default whenever a tracking URI is set (``tracking.uri``, else ``$MLFLOW_TRACKING_URI``;
``encode`` also takes its ``--mlflow-uri``); ``tracking.enabled=false`` turns it off. The run
is logged when the job returns (complete, or FAILED with the shards still missing): its
config as params, counts, skips by reason and throughput as metrics, the ``_manifest.json``
and the summary table as artifacts, and its data as MLflow datasets (``training/tracking_data.py``):
the shard job's image shards with context ``output``; the encode job's image shards with
context ``source`` and its latent shards with context ``output``, so its run shows which image
dataset made which latent dataset. Experiment and name follow the tracking rule
(``training/tracking.py``): ``tracking.experiment`` (default ``latentpipe``) and
``tracking.run_name``, else ``shard <source> -> <folder>`` / ``encode <encoder id>``.

The data job never fails because of tracking: the manifest is on disk; a store that cannot be
reached costs one warning naming it.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("latentpipe.tracking")


@dataclass
class JobTracking:
    """The ``tracking:`` section of the shard and encode configs (run-only: not in the manifest)."""

    enabled: bool = True            # a run per job whenever a tracking URI is set
    uri: str | None = None          # None: $MLFLOW_TRACKING_URI (encode: its mlflow_uri first)
    experiment: str = "latentpipe"  # every run of one pipeline (shard, encode, train, eval) goes here
    run_name: str | None = None     # None: shard <source> -> <folder> / encode <encoder id>


@dataclass
class JobRecord:
    """What one job did, for its run."""

    job: str                        # "shard" | "encode"
    name: str                       # the default run name
    params: Mapping[str, Any]
    metrics: Mapping[str, float]
    datasets: Sequence[tuple[str, Mapping[str, Any] | None, str]]  # (folder, manifest, context)
    manifest: Mapping[str, Any] | None
    summary: str                    # the end-of-run table
    seconds: float
    complete: bool


def counts(totals: Mapping[str, Any], seconds: float) -> dict[str, float]:
    """A manifest's totals as metrics: counts, ``skipped/<reason>``, ``samples_per_s``."""
    out = {k: float(totals[k]) for k in ("inputs", "written", "duplicates", "bytes") if k in totals}
    out.update({f"skipped/{r}": float(n) for r, n in (totals.get("skipped") or {}).items()})
    out["skipped"] = float(sum((totals.get("skipped") or {}).values()))
    out["wall_seconds"] = float(seconds)
    out["samples_per_s"] = float(totals.get("written", 0)) / max(seconds, 1e-9)
    return out


def log_job(cfg: JobTracking, record: JobRecord, fallback_uri: str | None = None) -> str | None:
    """Log ``record`` as a finished run; its id, or None when off, unset or unreachable (warned)."""
    uri = cfg.uri or fallback_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not cfg.enabled or not uri:
        return None
    try:
        return _log(cfg, record, uri)
    except Exception as e:  # the data is on disk; tracking is a view of it
        log.warning("%s job: not recorded in MLflow at %s (%s: %s); its manifest is on disk", record.job, uri,
                    type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        return None


def _log(cfg: JobTracking, rec: JobRecord, uri: str) -> str:
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag

    from latentpipe.training.tracking import flatten_params, git_commit
    from latentpipe.training.tracking_data import ShardDataset, dataset_input
    from latentpipe.training.tracking_sender import artifact_location
    from latentpipe.training.tracking_spool import fast_fail_http

    if uri.startswith(("http://", "https://")):
        fast_fail_http(10)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.get_experiment_by_name(cfg.experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(cfg.experiment, artifact_location(uri))
    now = int(time.time() * 1000)
    tags = {"latentpipe.job": rec.job, "mlflow.source.type": "JOB", "mlflow.source.name": f"latentpipe {rec.job}"}
    if commit := git_commit():
        tags.update({"git_commit": commit, "mlflow.source.git.commit": commit})
    run = client.create_run(exp_id, start_time=now - int(rec.seconds * 1000), tags=tags,
                            run_name=cfg.run_name or rec.name)
    run_id = run.info.run_id
    params = [Param(k, v) for k, v in flatten_params(rec.params).items()]
    for i in range(0, len(params), 100):
        client.log_batch(run_id, params=params[i:i + 100])
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in rec.metrics.items()],
                     tags=[RunTag("latentpipe.complete", str(rec.complete).lower())])
    inputs = [dataset_input(ShardDataset(root, manifest).entity_dict(), context)
              for root, manifest, context in rec.datasets if manifest]
    if inputs:
        client.log_inputs(run_id, datasets=inputs)
    with tempfile.TemporaryDirectory(prefix=f"latentpipe-{rec.job}-") as tmp:
        if rec.manifest is not None:
            (Path(tmp) / "_manifest.json").write_text(json.dumps(rec.manifest, indent=1, default=str))
        (Path(tmp) / "summary.txt").write_text(rec.summary + "\n")
        client.log_artifacts(run_id, tmp)
    client.set_terminated(run_id, "FINISHED" if rec.complete else "FAILED")
    log.info("%s job recorded in MLflow at %s: run %s (%s)", rec.job, uri, run_id, cfg.run_name or rec.name)
    return str(run_id)


__all__ = ["JobRecord", "JobTracking", "counts", "log_job"]
