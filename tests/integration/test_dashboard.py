"""The MLflow dashboard a person watches, read back through a real ``mlflow server``'s REST API.

One small pipeline logs into one server (module fixture): the real ``shard`` job (12 synthetic
scenes, 2 shards) and ``encode`` job (a tiny random VAE) on the local Ray cluster, a 4-step toy
training with 2 DeepSpeed ranks that registers its export, and the eval logging of that
registered version. The checks read what a dashboard reads: run names and the experiment
rule, the training run's dataset input with the manifest's digest, the logged model linked to
the run and to the registered version, the eval table, and the data jobs' runs with their
counts. One check renders the run page in a real headless Chromium (skipped, with the
reason, when ``chromium`` is not installed).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from latentpipe.training.tracking_data import manifest_digest
from tests.integration.mlflow_fixtures import MlflowServer

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
EXPERIMENT = "dash-pipeline"
MODEL = "dash-toy"
EVAL = {"caption_accuracy": 0.25, "frechet": 12.5, "sampling_seconds_per_image": 0.01}


def api(server: MlflowServer, path: str, body: dict[str, Any] | None = None, **query: Any) -> Any:
    """One REST call (GET with ``query``, or POST ``body``) to the server; the parsed JSON."""
    url = f"{server.uri}/api/2.0/mlflow/{path}"
    if query:
        url += "?" + urllib.parse.urlencode(query)
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def runs_by_job(server: MlflowServer, exp_id: str) -> dict[str, dict[str, Any]]:
    runs = api(server, "runs/search", {"experiment_ids": [exp_id], "max_results": 50})["runs"]
    out = {}
    for run in runs:
        tags = {t["key"]: t["value"] for t in run["data"].get("tags", [])}
        out[tags.get("latentpipe.job", "train")] = run
    return out


def metrics(run: dict[str, Any]) -> dict[str, float]:
    return {m["key"]: m["value"] for m in run["data"].get("metrics", [])}


def inputs(run: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """context -> dataset of a run's dataset inputs."""
    out = {}
    for di in run["inputs"].get("dataset_inputs", []):
        tags = {t["key"]: t["value"] for t in di.get("tags", [])}
        out[tags["mlflow.data.context"]] = di["dataset"]
    return out


@pytest.fixture(scope="module")
def dash(tmp_path_factory: pytest.TempPathFactory, ray_local: None) -> Iterator[dict[str, Any]]:
    """The pipeline above, logged into one real server; yields the server and the paths."""
    from latentpipe.pipeline.commands.eval import log_to_mlflow
    from latentpipe.pipeline.encode import EncodeConfig, run_encode
    from latentpipe.pipeline.job_tracking import JobTracking
    from latentpipe.pipeline.shard import ShardConfig, run_shard_job
    from latentpipe.preprocessing.config import from_dict
    from tests.unit.test_encoders import make_vae

    root = tmp_path_factory.mktemp("dash")
    server = MlflowServer(root / "server")
    server.start()
    try:
        tracking = {"uri": server.uri, "experiment": EXPERIMENT}
        shard = run_shard_job(from_dict(ShardConfig, {
            "source": {"spec": "synthetic:12", "synthetic_size": 32}, "out": str(root / "data"),
            "samples_per_shard": 6, "image": {"size": 32, "format": "png"}, "tracking": tracking}), progress=False)
        assert shard.manifest is not None
        enc = run_encode(EncodeConfig(images=str(root / "data" / "images"), out=str(root / "data"),
                                      vae=str(make_vae(root / "vae")), batch_size=4, num_actors=1,
                                      tracking=JobTracking(**tracking)), show_progress=False)
        env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
        cmd = [sys.executable, "-m", "latentpipe.pipeline.cli", "train", str(ROOT / "configs" / "train_toy.yaml"),
               f"data.shards={root / 'data' / 'images'}", f"workdir={root / 'train'}", "steps=4", "eval_every=2",
               "sample_every=4", "checkpoint.every_steps=4", "data.batch_size=2", "data.num_workers=0",
               "tracking.system_metrics=false", f"tracking.uri={server.uri}", f"tracking.experiment={EXPERIMENT}",
               f"tracking.register_as={MODEL}", "--launcher", "torchrun", "--nproc", "2"]
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        os.environ["MLFLOW_TRACKING_URI"] = server.uri  # `latentpipe eval` logs through MLflow's global URI
        try:
            log_to_mlflow(f"models:/{MODEL}@final", {"family": "toy"}, EVAL,
                          {"model": f"models:/{MODEL}@final", "family": "toy", "n": 8, "sampler": None, "steps": None,
                           "cfg": None, "seed": 0}, Image.new("RGB", (16, 16)), EXPERIMENT)
        finally:
            os.environ.pop("MLFLOW_TRACKING_URI")
        yield {"server": server, "root": root, "latents": Path(enc["out_dir"]),
               "exp_id": api(server, "experiments/get-by-name", experiment_name=EXPERIMENT)["experiment"]["experiment_id"]}
    finally:
        server.stop()


def test_every_run_is_named_for_what_it_is_in_the_pipelines_experiment(dash: dict[str, Any]) -> None:
    runs = runs_by_job(dash["server"], dash["exp_id"])
    assert set(runs) == {"shard", "encode", "train"}  # the rule: one experiment per pipeline, nothing elsewhere
    names = {job: r["info"]["run_name"] for job, r in runs.items()}
    assert names == {"shard": "shard synthetic:12 -> data/images",
                     "encode": f"encode data/images -> {dash['latents'].name}",
                     "train": "toy train"}


def test_training_run_shows_its_dataset_with_the_manifest_digest(dash: dict[str, Any]) -> None:
    images = dash["root"] / "data" / "images"
    manifest = json.loads((images / "_manifest.json").read_text())
    run = runs_by_job(dash["server"], dash["exp_id"])["train"]
    ds = inputs(run)["training"]
    assert ds["digest"] == manifest_digest(manifest)
    assert ds["name"] == "images:data"
    assert json.loads(ds["source"]) == {"uri": images.resolve().as_uri()}
    profile = json.loads(ds["profile"])
    assert profile["samples"] == 12 and profile["shards"] == 2 and profile["skipped"] == {}
    assert [c["name"] for c in json.loads(ds["schema"])["mlflow_colspec"]] == ["key", "caption", "png", "json"]
    # MLflow's search by dataset finds the run
    found = api(dash["server"], "runs/search", {"experiment_ids": [dash["exp_id"]],
                                                "filter": f"dataset.digest = '{manifest_digest(manifest)}'"})
    assert {r["info"]["run_name"] for r in found["runs"]} >= {"toy train"}


def test_export_is_a_logged_model_of_the_run_linked_to_the_registered_version(dash: dict[str, Any]) -> None:
    server = dash["server"]
    run = runs_by_job(server, dash["exp_id"])["train"]
    run_id = run["info"]["run_id"]
    outputs = run["outputs"]["model_outputs"]
    assert len(outputs) == 1 and int(outputs[0]["step"]) == 4
    model = api(server, f"logged-models/{outputs[0]['model_id']}")["model"]
    assert model["info"]["source_run_id"] == run_id and model["info"]["status"] == "LOGGED_MODEL_READY"
    assert model["info"]["model_type"] == "toy" and model["info"]["name"] == "final"
    linked = {m["key"] for m in model["data"]["metrics"]}
    assert {"loss/model", "eval/model/loss"} <= linked and not any(k.startswith("system/") for k in linked)
    tags = {t["key"]: t["value"] for t in model["info"]["tags"]}
    version = api(server, "registered-models/alias", name=MODEL, alias="final")["model_version"]
    assert json.loads(tags["mlflow.modelVersions"]) == [{"name": MODEL, "version": version["version"]}]
    # MLflow's SQL registry keeps no model_id on a version: its source is the logged model's storage
    assert version["source"] == model["info"]["artifact_uri"] and version["run_id"] == run_id

    import mlflow.pyfunc

    model_dir = mlflow.artifacts.download_artifacts(artifact_uri=version["source"], tracking_uri=server.uri,
                                                    dst_path=str(dash["root"] / "model"))
    pyfunc = mlflow.pyfunc.load_model(model_dir)  # the model from code: mlflow_model.py + safetensors
    out = pyfunc.predict(np.zeros((1, 3, 32, 32), np.float32))
    assert isinstance(out, np.ndarray) and out.shape[0] == 1 and np.isfinite(out).all()


def test_eval_is_a_table_and_tags_on_the_registered_version(dash: dict[str, Any],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow import MlflowClient

    server = dash["server"]
    version = api(server, "registered-models/alias", name=MODEL, alias="final")["model_version"]
    tags = {t["key"]: t["value"] for t in version.get("tags", [])}
    assert float(tags["eval.caption_accuracy"]) == EVAL["caption_accuracy"]
    assert tags["eval.settings"] == "default n=8 seed=0" and tags["eval.run_id"] == version["run_id"]
    with urllib.request.urlopen(f"{server.uri}/get-artifact?path=eval/results.json&run_uuid={version['run_id']}") as r:
        raw = json.loads(r.read())
    assert set(raw) == {"columns", "data"}  # MLflow's table artifact, as the UI's table view reads it
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)  # load_table searches runs through the global URI
    table = MlflowClient(server.uri).load_table(dash["exp_id"], "eval/results.json", run_ids=[version["run_id"]])
    assert len(table) == 1 and table["caption_accuracy"][0] == EVAL["caption_accuracy"]
    assert table["version"][0] == int(version["version"]) and table["frechet"][0] == EVAL["frechet"]


def test_shard_and_encode_jobs_have_runs_with_counts_and_lineage(dash: dict[str, Any]) -> None:
    server, root = dash["server"], dash["root"]
    runs = runs_by_job(server, dash["exp_id"])
    images = json.loads((root / "data" / "images" / "_manifest.json").read_text())
    latents = json.loads((dash["latents"] / "_manifest.json").read_text())
    shard, enc = metrics(runs["shard"]), metrics(runs["encode"])
    assert shard["written"] == 12 and shard["inputs"] == 12 and shard["shards"] == 2 and shard["skipped"] == 0
    assert shard["samples_per_s"] > 0 and shard["shards_failed"] == 0
    assert enc["written"] == 12 and enc["shards"] == 2 and enc["shards_encoded_now"] == 2 and enc["samples_per_s"] > 0
    assert inputs(runs["shard"])["output"]["digest"] == manifest_digest(images)
    assert {k: v["digest"] for k, v in inputs(runs["encode"]).items()} == {
        "source": manifest_digest(images), "output": manifest_digest(latents)}
    profile = json.loads(inputs(runs["encode"])["output"]["profile"])
    assert list(profile["encoders"]) == ["vae"] and profile["encoder_id"] == dash["latents"].name
    for job, manifest in (("shard", images), ("encode", latents)):
        run_id = runs[job]["info"]["run_id"]
        assert runs[job]["info"]["status"] == "FINISHED"
        with urllib.request.urlopen(f"{server.uri}/get-artifact?path=_manifest.json&run_uuid={run_id}") as r:
            assert json.loads(r.read()) == manifest


def test_run_page_renders_the_datasets_panel_in_a_real_browser(dash: dict[str, Any], tmp_path: Path) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (Debian: apt-get install -y chromium)")
    run = runs_by_job(dash["server"], dash["exp_id"])["train"]
    url = f"{dash['server'].uri}/#/experiments/{dash['exp_id']}/runs/{run['info']['run_id']}"
    done = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=60000",
                           "--dump-dom", url], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Datasets" in done.stdout and "images:data" in done.stdout
