"""MLflow tracking: a real ``mlflow server`` (SQLite backend) on 127.0.0.1, and a dead port.

The slow test trains for real (Horovod, 2 epochs) and scores, then reads the run back with
``MlflowClient``: params, one metric row per epoch, the artifacts, scoring's metrics. The
dead-port tests use a port nothing listens on: creating the run is one warning and no run,
and a logger whose server is gone never blocks the caller and closes in bounded time.
"""
from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from pipeline import tracking


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tracking_warnings(caplog):
    return [r for r in caplog.records if r.name == "pipeline.tracking" and r.levelno >= logging.WARNING]


def test_flatten_and_keys():
    assert tracking.flatten({"train": {"epochs": 3, "nics": ["lo"], "early_stopping": {"patience": 2}},
                             "spark": {"conf": {}}}) == {
        "train.epochs": 3, "train.nics": ["lo"], "train.early_stopping.patience": 2, "spark.conf": {}}
    assert tracking.mlflow_key("recall.t-shirt (top)") == "recall.t-shirt _top_"


def test_unset_uri_means_a_local_sqlite_store_beside_the_model_dir(tmp_path, monkeypatch):
    from pipeline.config import load_config

    monkeypatch.delenv(tracking.ENV_URI, raising=False)
    uri, artifacts = tracking.resolve_store(load_config().tracking, "file://" + str(tmp_path / "root" / "model"))
    assert uri == f"sqlite:///{tmp_path}/root/mlruns/mlflow.db"
    assert artifacts == f"file://{tmp_path}/root/mlruns/artifacts"
    monkeypatch.setenv(tracking.ENV_URI, "http://127.0.0.1:1")
    assert tracking.resolve_store(load_config().tracking, "file:///x/model") == ("http://127.0.0.1:1", None)
    # tracking.uri wins over the environment.
    cfg = load_config(overrides=["tracking.uri=http://127.0.0.1:2"])
    assert tracking.resolve_store(cfg.tracking, "file:///x/model") == ("http://127.0.0.1:2", None)


def test_a_dead_server_is_one_warning_and_no_run(tmp_path, caplog):
    from pipeline.config import load_config

    cfg = load_config(overrides=[f"tracking.uri=http://127.0.0.1:{_free_port()}"])
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="pipeline.tracking"):
        ref = tracking.start_training_run(cfg, "file://" + str(tmp_path / "model"), run_name="x")
    assert ref is None
    assert time.monotonic() - t0 < 5
    (w,) = _tracking_warnings(caplog)
    assert "not reachable" in w.getMessage() and "training goes on" in w.getMessage()


def test_a_logger_whose_server_died_never_blocks_and_warns_once(caplog):
    ref = tracking.RunRef(f"http://127.0.0.1:{_free_port()}", "0" * 32, "1")
    with caplog.at_level(logging.WARNING, logger="pipeline.tracking"):
        logger = tracking.AsyncLogger(ref, queue_size=1000, flush_timeout_s=30, request_timeout_s=2)
        t0 = time.monotonic()
        for epoch in range(1, 501):
            logger.metrics({"train_loss": 1.0 / epoch, "train_accuracy": 0.5}, step=epoch)
        submitted = time.monotonic() - t0
        t1 = time.monotonic()
        logger.close()
        closed = time.monotonic() - t1
    assert submitted < 1.0  # 500 epochs' worth of calls, none waiting for the network
    assert closed < 30
    assert logger.failed is not None  # the first call failed and turned the logger off
    assert len(_tracking_warnings(caplog)) == 1


# --- a real server -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log_file = (root / "server.log").open("wb")
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root}/mlflow.db", "--artifacts-destination", str(root / "artifacts"),
         "--workers", "1"],
        stdout=log_file, stderr=subprocess.STDOUT, cwd=root)
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited {proc.returncode}: {(root / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not answer /health within 120 s: "
                            f"{(root / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log_file.close()


@pytest.mark.slow
def test_training_and_scoring_land_in_one_mlflow_run(spark, sample_config, ingested_sample, mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    from pipeline import score, train

    cfg = sample_config.model_copy(update={
        "train": sample_config.train.model_copy(update={"epochs": 2, "num_proc": 1}),
        "tracking": sample_config.tracking.model_copy(update={"uri": mlflow_server, "experiment": "tests"})})
    model_dir = tmp_path / "model"
    out = train.run(spark, cfg, data_uri=ingested_sample, model_dir="file://" + str(model_dir), mode="overwrite")
    run_id = out["mlflow"]["run_id"]
    card = json.loads((model_dir / "model.json").read_text())
    assert card["mlflow"] == {"tracking_uri": mlflow_server, "run_id": run_id,
                              "experiment_id": out["mlflow"]["experiment_id"]}
    scored = score.run(spark, cfg, data_uri=ingested_sample, model_uri="file://" + str(model_dir),
                       output_uri="file://" + str(tmp_path / "scores"), split="test", mode="error")

    client = MlflowClient(tracking_uri=mlflow_server)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "tests"
    params = run.data.params
    assert params["train.epochs"] == "2" and params["train.num_proc"] == "1"
    assert params["data.ingest_manifest_sha256"] == card["ingest_manifest_sha256"]
    assert params["stack.tensorflow"] == card["stack"]["tensorflow"]
    assert params["tracking.uri"] == mlflow_server
    for metric in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "learning_rate"):
        history = client.get_metric_history(run_id, metric)
        assert sorted(m.step for m in history) == [1, 2], metric
    rows = {int(r["epoch"]): r for r in _history(model_dir)}
    assert {m.step: m.value for m in client.get_metric_history(run_id, "val_accuracy")} == pytest.approx(
        {e: float(r["val_accuracy"]) for e, r in rows.items()})
    assert run.data.metrics["score.test.accuracy"] == pytest.approx(scored["metrics"]["accuracy"])

    def paths(path=None):
        out = []
        for f in client.list_artifacts(run_id, path):
            out += paths(f.path) if f.is_dir else [f.path]
        return out

    arts = set(paths())
    assert {"model.json", "history.csv", "training_curves.png", "model/model.keras", "model/saved_model/saved_model.pb",
            "scores/test/_metrics.json", "scores/test/confusion_matrix.png"} <= arts
    local = client.download_artifacts(run_id, "model.json", str(tmp_path / "dl"))
    assert json.loads(Path(local).read_text())["model_id"] == card["model_id"]


def _history(model_dir: Path):
    import csv

    with (model_dir / "history.csv").open() as f:
        return list(csv.DictReader(f))
