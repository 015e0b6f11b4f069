"""MLflow with a real PostgreSQL backend: a training run logs to ``postgresql://...`` and registers there.

The tracking URI is the database itself (MLflow's SQLAlchemy store, as a tracking server's
``--backend-store-uri`` would use it; infra/mlflow runs the same store behind ``mlflow server``).
The run's params, metrics and the registered model version are read back through
``MlflowClient`` and, to be sure they live in PostgreSQL, straight from its tables.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.integration.postgres_fixtures import PostgresServer, postgres  # noqa: F401
from tests.shards import make_image_shards

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
STEPS, MODEL, EXPERIMENT = 8, "toy-postgres", "postgres-backend"


def test_training_run_logs_and_registers_in_postgres(postgres: PostgresServer, tmp_path: Path,  # noqa: F811
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    shards = make_image_shards(tmp_path / "data", 3, 8)
    work, log = tmp_path / "run", tmp_path / "train.log"
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING="false")
    cmd = [sys.executable, "-m", "latentpipe.pipeline.cli", "train", str(ROOT / "configs/train_toy.yaml"),
           f"data.shards={shards}", f"workdir={work}", f"steps={STEPS}", "data.batch_size=4", "data.num_workers=0",
           "checkpoint.every_steps=0", "eval_every=4", "sample_every=0", f"tracking.uri={postgres.uri}",
           f"tracking.experiment={EXPERIMENT}", "tracking.run_name=pg-run", f"tracking.register_as={MODEL}"]
    # cwd: with a database URI, MLflow puts artifacts under ./mlruns of the process that creates the experiment
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        rc = proc.wait(timeout=600)  # a wait limit for a loaded machine, not a measured threshold
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        rc = -9
    assert rc == 0, log.read_text(errors="replace")[-4000:]

    client = MlflowClient(tracking_uri=postgres.uri, registry_uri=postgres.uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    assert exp is not None
    (run,) = client.search_runs([exp.experiment_id])
    run_id = run.info.run_id
    assert run.info.status == "FINISHED" and run.info.run_name == "pg-run"
    assert run.data.params["model.kind"] == "toy" and run.data.params["steps"] == str(STEPS)
    loss = client.get_metric_history(run_id, "loss/model")
    assert sorted(m.step for m in loss) == list(range(1, STEPS + 1))
    assert all(np.isfinite(m.value) for m in loss)
    assert {m.step for m in client.get_metric_history(run_id, "eval/model/loss")} == {4, 8}

    (version,) = client.search_model_versions(f"name='{MODEL}'")
    assert version.run_id == run_id and version.status == "READY"
    assert version.tags["step"] == str(STEPS)

    # The rows are in PostgreSQL itself.
    conn = postgres.connect()
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT value FROM params WHERE run_uuid = %s AND key = 'steps'", (run_id,))
            assert cur.fetchall() == [(str(STEPS),)]
            cur.execute("SELECT count(*) FROM metrics WHERE run_uuid = %s AND key = 'loss/model'", (run_id,))
            assert cur.fetchone() == (STEPS,)
            cur.execute("SELECT name, version, run_id FROM model_versions")
            assert cur.fetchall() == [(MODEL, int(version.version), run_id)]
    finally:
        conn.close()

    # The registered version is a working model: the exported toy net, loaded from code.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", postgres.uri)
    model = mlflow.pyfunc.load_model(f"models:/{MODEL}/{version.version}")
    x = np.random.default_rng(0).uniform(-1, 1, (2, 3, 32, 32)).astype(np.float32)
    out = model.predict(x)
    assert out.shape == (2, 3) and np.isfinite(out).all()
