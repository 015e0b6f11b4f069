"""The tracking rules outside a full pipeline, against real MLflow sqlite stores: data-job runs
(off switch, FAILED while shards are missing, an unreachable store costs a warning only), the
eval run of a model that is not registered, run names and datasets without a manifest."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from mlflow import MlflowClient
from PIL import Image

from latentpipe.pipeline.job_tracking import JobRecord, JobTracking, counts, log_job
from latentpipe.training.tracking import default_run_name
from latentpipe.training.tracking_data import ShardDataset, manifest_digest
from tests.integration.mlflow_fixtures import free_port, migrated_sqlite

pytestmark = pytest.mark.integration

MANIFEST = {"kind": "images", "shard_count": 1, "image": {"format": "png"},
            "totals": {"inputs": 5, "written": 3, "skipped": {"corrupt": 2}, "duplicates": 0, "bytes": 10}}


def record(folder: Path, complete: bool) -> JobRecord:
    return JobRecord("shard", "shard test -> x/images", {"samples_per_shard": 5}, counts(MANIFEST["totals"], 2.0),
                     [(str(folder), MANIFEST, "output")], MANIFEST, "table", 2.0, complete)


def test_a_job_with_missing_shards_is_a_failed_run_with_its_counts(tmp_path: Path) -> None:
    uri = migrated_sqlite(tmp_path / "mlflow.db")
    run_id = log_job(JobTracking(uri=uri, experiment="jobs"), record(tmp_path / "images", complete=False))
    assert run_id is not None
    run = MlflowClient(uri).get_run(run_id)
    assert run.info.status == "FAILED" and run.info.run_name == "shard test -> x/images"
    assert run.data.metrics["skipped/corrupt"] == 2 and run.data.metrics["written"] == 3
    assert run.data.metrics["samples_per_s"] == 1.5 and run.data.tags["latentpipe.complete"] == "false"
    assert run.inputs.dataset_inputs[0].dataset.digest == manifest_digest(MANIFEST)
    assert MlflowClient(uri).get_experiment(run.info.experiment_id).name == "jobs"


def test_tracking_off_or_no_uri_logs_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    uri = migrated_sqlite(tmp_path / "mlflow.db")
    assert log_job(JobTracking(uri=uri, enabled=False), record(tmp_path, True)) is None
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert log_job(JobTracking(), record(tmp_path, True)) is None
    assert MlflowClient(uri).search_experiments(filter_string="name = 'latentpipe'") == []


def test_an_unreachable_store_costs_a_warning_not_the_job(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with caplog.at_level(logging.WARNING, logger="latentpipe.tracking"):
        assert log_job(JobTracking(uri=uri), record(tmp_path, True)) is None
    assert f"shard job: not recorded in MLflow at {uri}" in caplog.text


def test_eval_of_an_unregistered_model_is_a_run_in_the_given_experiment(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from latentpipe.pipeline.commands.eval import log_to_mlflow

    uri = migrated_sqlite(tmp_path / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    settings = {"model": "runs/ddpm", "family": "ddpm", "n": 8, "sampler": "ddim", "steps": 10, "cfg": 3.0, "seed": 0}
    log_to_mlflow(str(tmp_path / "runs" / "ddpm"), {"family": "ddpm"}, {"caption_accuracy": 0.5}, settings,
                  Image.new("RGB", (8, 8)), "my-pipeline")
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("my-pipeline")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.run_name == "eval ddpm ddpm" and run.data.metrics["eval/ddim-10-3.0/caption_accuracy"] == 0.5
    table = json.loads(Path(client.download_artifacts(run.info.run_id, "eval/results.json", str(tmp_path))).read_text())
    assert table["columns"][:3] == ["model", "version", "settings"] and table["data"][0][2] == "ddim-10-3.0"


def test_default_run_names_say_family_preset_and_workdir(tmp_path: Path) -> None:
    assert default_run_name({"kind": "ddpm", "backbone": "unet_demo"}, tmp_path / "ddpm") == "ddpm/unet_demo ddpm"
    assert default_run_name({"kind": "kl_vae", "arch": {"preset": "kl_demo"}}, tmp_path / "kl") == "kl_vae/kl_demo kl"
    assert default_run_name({"kind": "ar", "net": {"arch": "llama"}}, tmp_path / "ar") == "ar/llama ar"
    assert default_run_name({"kind": "toy"}, tmp_path / "t") == "toy t"


def test_a_folder_without_manifest_is_a_dataset_digested_by_its_fingerprint(tmp_path: Path) -> None:
    ds = ShardDataset(str(tmp_path / "x" / "shards"), None, fingerprint="0123456789abcdef", num_samples=7)
    rec = ds.entity_dict()
    assert rec["digest"] == "0123456789abcdef" and rec["name"] == "shards:x/shards" and rec["schema"] is None
    assert json.loads(rec["profile"]) == {"samples": 7} and rec["source_type"] == "local"
    with pytest.raises(ValueError, match="needs a manifest or a fingerprint"):
        ShardDataset(str(tmp_path), None)
