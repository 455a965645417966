"""A real multi-process Spark standalone cluster on 127.0.0.1: master + 2 workers x 1 core.

Proves what a cluster user relies on and local[2] cannot show: Horovod's two
processes run in two different executors (on two workers), the jobs run through
``spark-submit`` with the ``make dist`` artefacts (executors on the packed env
``--archives pixelmill-env.tar.gz#env`` with ``./env/bin/python``), and the
harness stops every daemon it started, also when the body fails.
"""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import List

import numpy as np
import pytest

from outputs import version_dir
from cluster import ClusterError, spark_submit, standalone_cluster
from conftest import SAMPLE_INGEST_OVERRIDES

REPO = Path(__file__).resolve().parents[1]
DIST = REPO / "dist"
ARCHIVE = DIST / "pixelmill-env.tar.gz"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]


def _summary(proc: subprocess.CompletedProcess) -> dict:
    """The JSON summary a job prints as its last stdout line (fails with the job's stderr tail)."""
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    assert proc.returncode == 0 and lines, (
        f"exit {proc.returncode}: {' '.join(proc.args[-12:])}\nstdout:\n{proc.stdout[-3000:]}\n"
        f"stderr:\n{proc.stderr[-6000:]}")
    return json.loads(lines[-1])


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with standalone_cluster(tmp_path_factory.mktemp("standalone"), workers=2, cores_per_worker=1) as c:
        yield c


def submit_confs(cluster) -> List[str]:
    """spark-submit flags for the test cluster: loopback driver, one 1-core executor per worker."""
    confs = {
        "spark.driver.host": "127.0.0.1",
        "spark.driver.bindAddress": "127.0.0.1",
        "spark.executor.cores": "1",
        "spark.cores.max": "2",
        "spark.executor.memory": "1g",
        "spark.ui.enabled": "false",
        # Client mode: the driver runs here, on the venv (an edge node's install).
        "spark.pyspark.driver.python": sys.executable,
    }
    return ["--master", cluster.master_url, *[a for k, v in confs.items() for a in ("--conf", f"{k}={v}")]]


# --- the harness itself --------------------------------------------------------------------

def test_harness_stops_every_daemon_also_when_the_body_fails(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with standalone_cluster(tmp_path, workers=1) as c:
            procs = [d.proc for d in c.daemons]
            master_port = int(c.master_url.rsplit(":", 1)[1])
            assert [p.poll() for p in procs] == [None, None]
            assert c.alive_workers() == 1
            raise RuntimeError("boom")
    assert all(p.poll() is not None for p in procs)
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", master_port)) != 0  # nothing listens on the master port any more


def test_harness_reports_a_daemon_that_dies_and_still_stops_the_rest(tmp_path):
    # A worker with an invalid --memory exits at once: the harness says which daemon and shows its log,
    # and the master it had already started is stopped too.
    with pytest.raises(ClusterError, match=r"worker-0 exited while waiting for 1 ALIVE workers") as exc:
        with standalone_cluster(tmp_path, workers=1, memory_per_worker="lots"):
            pytest.fail("the cluster must not come up")
    assert "--- worker-0" in str(exc.value)
    import psutil

    leftovers = [p.info for p in psutil.process_iter(["pid", "cmdline"])
                 if any(str(tmp_path) in a for a in (p.info["cmdline"] or []))]
    assert leftovers == []


def test_horovod_ranks_run_in_two_executors_on_two_workers(cluster):
    proc = spark_submit([*submit_confs(cluster), "--conf", f"spark.pyspark.python={sys.executable}",
                         str(REPO / "tests" / "cluster.py"), "horovod-check", "2"], timeout_s=900)
    results = sorted(_summary(proc)["results"], key=lambda r: r["rank"])
    assert [r["rank"] for r in results] == [0, 1]
    assert [r["size"] for r in results] == [2, 2]
    assert [r["sum"] for r in results] == [3.0, 3.0]  # allreduce of 1 + 2 across the executors
    np.testing.assert_array_equal(np.array(results[0]["weights"]), np.array(results[1]["weights"]))
    # Each Horovod process runs in its executor's work dir <worker dir>/<app id>/<executor id>.
    homes = []
    for r in results:
        cwd = Path(r["cwd"]).resolve()
        owner = [i for i, w in enumerate(cluster.worker_dirs) if cwd.is_relative_to(w.resolve())]
        assert len(owner) == 1, f"rank {r['rank']} ran in {cwd}, outside the workers' dirs {cluster.worker_dirs}"
        homes.append((owner[0], cwd.relative_to(cluster.worker_dirs[owner[0]].resolve()).parts))
    assert sorted(w for w, _ in homes) == [0, 1]  # one rank per worker
    assert homes[0][1][0] == homes[1][1][0]  # same application
    assert homes[0][1][1] != homes[1][1][1]  # different executors


# --- the packaged pipeline on the cluster ------------------------------------------------------

def _newest_mtime(paths) -> float:
    return max(p.stat().st_mtime for p in paths)


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """``make dist`` artefacts: the env archive (rebuilt when its inputs changed) and a fresh wheel.

    The archive holds the dependencies (slow to pack, changes with pyproject.toml); the
    current pixelmill code rides along as the freshly built wheel via ``--py-files``, which
    executors put ahead of the env's site-packages. That is also how a hotfix ships
    without repacking.
    """
    inputs = [REPO / "pyproject.toml", REPO / "scripts" / "dist.sh"]
    if not ARCHIVE.is_file() or ARCHIVE.stat().st_mtime < _newest_mtime(inputs):
        p = subprocess.run(["bash", str(REPO / "scripts" / "dist.sh")], cwd=REPO, capture_output=True, text=True,
                           timeout=1800)
        assert p.returncode == 0, f"make dist failed:\n{p.stderr[-4000:]}"
    out = tmp_path_factory.mktemp("wheel")
    p = subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), str(REPO)],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    wheel = next(out.glob("pixelmill-*.whl"))
    # --py-files takes .zip/.egg; a pure wheel is a zip with pipeline/ at its root.
    code_zip = out / "pixelmill.zip"
    shutil.copyfile(wheel, code_zip)
    for junk in ("build/lib", "build/bdist.linux-x86_64"):
        shutil.rmtree(REPO / junk, ignore_errors=True)
    return {"archive": ARCHIVE, "code_zip": code_zip}


def test_ingest_train_score_on_the_cluster_with_the_packed_env(cluster, packed, raw_sample, tmp_path):
    out = tmp_path / "out"
    common = [
        *submit_confs(cluster),
        "--archives", f"{packed['archive']}#env",
        "--conf", "spark.pyspark.python=./env/bin/python",
        "--py-files", str(packed["code_zip"]),
    ]
    # conf/cluster.yaml as a user would pass it, shrunk to this 2 x 1-core cluster.
    overrides = ["spark.conf.spark.executor.cores=1", "spark.conf.spark.executor.memory=1g",
                 "spark.conf.spark.executor.memoryOverhead=512m",
                 "spark.conf.spark.driver.memory=1g", "spark.conf.spark.sql.shuffle.partitions=4",
                 "spark.ui_enabled=false", "spark.log_level=ERROR", "train.nics=[lo]", "train.start_timeout=300",
                 *SAMPLE_INGEST_OVERRIDES, "train.batch_size=16", "train.intra_op_threads=1",
                 "train.inter_op_threads=1", "loader.workers_count=1", "loader.shuffle_buffer=256"]
    cfg_args = ["--config", str(REPO / "conf" / "cluster.yaml"), *[a for o in overrides for a in ("--set", o)]]
    jobs = REPO / "jobs"

    # The whole chain as one application (jobs/run.py: ingest, train, score, report), as a user runs it
    # on one cluster: the archive is unpacked once per worker, not once per stage. The stage entry
    # points are the same functions (tests/test_score.py and tests/test_run.py submit them locally).
    run = _summary(spark_submit([*common, str(jobs / "run.py"), "--input", f"file://{raw_sample}",
                                 "--output-root", f"file://{out}", "--num-proc", "2", "--epochs", "1",
                                 "--split", "test", *cfg_args], timeout_s=1800))
    stages = run["stages"]
    assert [stages[s]["action"] for s in ("ingest", "train", "score")] == ["ran", "ran", "ran"]
    assert stages["ingest"]["accepted"] == 144 == stages["ingest"]["images"]

    manifest = json.loads((version_dir(out / "ingest") / "_manifest.json").read_text())
    model_json = json.loads((out / "model" / "model.json").read_text())
    assert (out / "model" / "model" / "model.keras").is_file()
    assert model_json["num_proc"] == 2 and model_json["epochs_completed"] == 1
    import pyarrow.parquet as pq

    table = pq.read_table(str(version_dir(out / "scores") / "predictions"))
    assert table.num_rows == manifest["splits"]["test"] == stages["score"]["images"]
    assert set(table.column("model_id").to_pylist()) == {model_json["model_id"]} == {run["model_id"]}
    assert (out / "report" / "index.html").is_file()

    # Every executor ran on the unpacked archive: ./env is in each executor's work dir, on both workers.
    unpacked = {w.name: sorted(str(p.relative_to(w)) for p in w.glob("app-*/*/env")) for w in cluster.worker_dirs}
    assert all(unpacked.values()), unpacked
