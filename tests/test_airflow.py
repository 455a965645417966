"""The Airflow DAG: it parses without heavy imports, renders per-run URIs, and really runs.

Airflow reads its configuration when first imported, so every test that imports
Airflow does it in a subprocess with ``AIRFLOW_HOME`` in a temp folder: the
pytest process is never configured for Airflow and nothing is written to ~/airflow.
"""
from __future__ import annotations

import importlib.metadata as md
import json
import os
import re
import subprocess
import sys
import textwrap
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import SAMPLE_INGEST_OVERRIDES
from outputs import version_dir
from pipeline import cli
from pipeline import orchestration as orch

REPO = Path(__file__).resolve().parents[1]
DAGS = REPO / "airflow_dags"
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.airflow


def airflow_env(home: Path) -> dict:
    env = dict(os.environ)
    env.update({
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home}/airflow.db",
        # JSON form: the URI form spark://local[2] silently becomes master yarn.
        "AIRFLOW_CONN_SPARK_DEFAULT": json.dumps({"conn_type": "spark", "host": "local[2]"}),
        "PATH": str(BIN) + os.pathsep + os.environ.get("PATH", ""),
        "SPARK_LOCAL_IP": "127.0.0.1",
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "PIXELMILL_SCHEDULE": "@daily",
    })
    for k in ("PYSPARK_GATEWAY_PORT", "PYSPARK_GATEWAY_SECRET", "PIXELMILL_JOBS_DIR"):
        env.pop(k, None)
    return env


def run_py(code: str, home: Path, timeout: float = 300) -> dict:
    """Run ``code`` under Airflow in a subprocess; it prints ``RESULT <json>`` as its last line."""
    home.mkdir(parents=True, exist_ok=True)
    p = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=airflow_env(home), cwd=home,
                       capture_output=True, text=True, timeout=timeout)
    lines = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
    assert p.returncode == 0 and lines, f"exit {p.returncode}\nstdout:\n{p.stdout[-4000:]}\nstderr:\n{p.stderr[-4000:]}"
    return json.loads(lines[-1][len("RESULT "):])


# --- the pyspark-client trap ------------------------------------------------------

def test_pyspark_files_are_not_overwritten_by_pyspark_client():
    # Airflow's Spark provider >= 6 pulls pyspark-client, which installs into site-packages/pyspark/
    # over pyspark's own files: then in-process pandas UDFs fail. 5.6.0 depends on pyspark itself.
    import pyspark

    installed = {d.metadata["Name"].lower() for d in md.distributions()}
    assert "pyspark-client" not in installed, "uninstall pyspark-client and pin apache-airflow-providers-apache-spark==5.6.0"
    assert md.version("apache-airflow-providers-apache-spark") == "5.6.0"
    assert pyspark.__version__ == md.version("pyspark")


# --- parsing: no DB, no heavy imports, the right wiring ---------------------------------

DAGBAG_PROBE = """
    import json, sys, time
    t0 = time.monotonic()
    from airflow.dag_processing.dagbag import DagBag
    bag = DagBag(dag_folder=sys.argv[1] if len(sys.argv) > 1 else %r)
    dag = bag.dags.get("pixelmill")
    # pixelmill's CLI contract and orchestration helpers may load; its stages and their libraries may not
    light = ("pipeline", "pipeline.cli", "pipeline.config", "pipeline.errors", "pipeline.fs",
             "pipeline.orchestration", "pipeline.orchestration_airflow")
    heavy = sorted([m for m in ("tensorflow", "horovod", "petastorm", "PIL", "pyspark", "pandas", "keras", "numpy",
                                "pyarrow") if m in sys.modules]
                   + [m for m in sys.modules if m.startswith("pipeline.") and m not in light])
    tasks = {
        t.task_id: {
            "downstream": sorted(t.downstream_task_ids),
            "retries": t.retries,
            "backoff": t.retry_exponential_backoff,
            "max_retry_delay_s": t.max_retry_delay.total_seconds(),
            "timeout_s": t.execution_timeout.total_seconds(),
            "application": t.application,
            "spark_binary": t._spark_binary,
            "conn_id": t._conn_id,
        } for t in (dag.tasks if dag else [])
    }
    print("RESULT " + json.dumps({
        "import_errors": {str(k): str(v) for k, v in bag.import_errors.items()},
        "dag_ids": sorted(bag.dag_ids), "heavy": heavy, "tasks": tasks,
        "params": sorted(dag.params.keys()) if dag else [],
        "score_split_enum": dag.params.get_param("score_split").schema.get("enum") if dag else None,
        "max_active_runs": dag.max_active_runs if dag else None,
        "catchup": dag.catchup if dag else None,
    }))
""" % str(DAGS)


@pytest.fixture(scope="module")
def parsed(tmp_path_factory):
    return run_py(DAGBAG_PROBE, tmp_path_factory.mktemp("airflow_parse"))


def test_dagbag_has_no_import_errors(parsed):
    assert parsed["import_errors"] == {}
    assert parsed["dag_ids"] == ["pixelmill"]


def test_dag_file_is_wiring_only(parsed):
    # Parsing must not import TensorFlow, Spark or pixelmill's stages: the scheduler parses this file every 30 s.
    assert parsed["heavy"] == []


def test_tasks_are_chained_with_retries_backoff_and_timeouts(parsed):
    spark_submit = str(BIN / "spark-submit")
    common = {"retries": 2, "backoff": 2.0, "max_retry_delay_s": 1800.0, "spark_binary": spark_submit,
              "conn_id": "spark_default"}
    assert parsed["tasks"] == {
        "ingest": {**common, "downstream": ["train"], "timeout_s": 7200.0, "application": str(REPO / "jobs/ingest.py")},
        "train": {**common, "downstream": ["score"], "timeout_s": 43200.0, "application": str(REPO / "jobs/train.py")},
        "score": {**common, "downstream": [], "timeout_s": 7200.0, "application": str(REPO / "jobs/score.py")},
    }
    assert parsed["params"] == sorted(["input_uri", "input_list", "output_root", "model_root", "num_proc", "epochs", "score_split", "config_files",
                                       "overrides", "archives", "executor_python", "driver_python"])
    assert parsed["max_active_runs"] == 1
    assert parsed["catchup"] is False


def test_broken_dag_file_is_reported_by_dagbag(tmp_path):
    # The integrity test above can fail: a DAG folder with a syntax error shows up in import_errors.
    bad = tmp_path / "dags"
    bad.mkdir()
    (bad / "broken.py").write_text("from airflow.sdk import DAG\nwith DAG(dag_id='x' as d:\n    pass\n")
    code = DAGBAG_PROBE.replace("sys.argv[1] if len(sys.argv) > 1 else", f"{str(bad)!r} or")
    out = run_py(code, tmp_path / "home")
    assert list(out["import_errors"]) == [str(bad / "broken.py")]
    assert out["dag_ids"] == []


# --- rendering: per-run URIs from run_after, also when logical_date is None ----------------

RENDER_PROBE = """
    import json, sys
    from datetime import datetime, timedelta, timezone
    from types import SimpleNamespace
    import pipeline.orchestration as mod
    params = {"input_uri": "file:///in", "output_root": "s3a://bucket/runs/", "num_proc": 4, "epochs": None,
              "score_split": "test", "config_files": ["cluster.yaml"], "overrides": ["train.batch_size=32"],
              "archives": None, "executor_python": None, "driver_python": "/opt/venv/bin/python"}
    manual = SimpleNamespace(run_after=datetime(2026, 11, 28, 15, 30, 5, 123456, tzinfo=timezone.utc), logical_date=None)
    other_tz = SimpleNamespace(run_after=datetime(2026, 11, 28, 16, 30, 5, tzinfo=timezone(timedelta(hours=1))),
                               logical_date=datetime(2026, 11, 27, tzinfo=timezone.utc))
    packed = dict(params, epochs=3, archives="hdfs:///apps/pixelmill-env.tar.gz#env", executor_python="./env/bin/python")
    print("RESULT " + json.dumps({
        "keys": [mod.run_key(manual), mod.run_key(other_tz)],
        "args": {s: mod.stage_args(s, params, manual) for s in mod.STAGES},
        "train_epochs": mod.stage_args("train", packed, manual),
        "conf": mod.spark_conf(params), "conf_packed": mod.spark_conf(packed),
        "own_models": mod.stage_uris(dict(params, model_root="hdfs:///models/"), manual),
    }))
"""


def test_stage_args_use_a_run_key_from_run_after(tmp_path):
    out = run_py(RENDER_PROBE, tmp_path)
    key = "20261128T153005Z"
    assert out["keys"] == [key, key]  # UTC, whatever the trigger's timezone; logical_date not used
    tail = ["--config", "cluster.yaml", "--set", "train.batch_size=32"]
    root = "s3a://bucket/runs"
    assert out["args"] == {
        "ingest": ["--input", "file:///in", "--output", f"{root}/ingest/run={key}", "--mode", "overwrite", *tail],
        "train": ["--data", f"{root}/ingest/run={key}", "--model-dir", f"{root}/models/run={key}", "--num-proc", "4",
                  "--mode", "resume", *tail],
        "score": ["--data", f"{root}/ingest/run={key}", "--model", f"{root}/models/run={key}",
                  "--output", f"{root}/predictions/run={key}", "--split", "test", "--mode", "overwrite", *tail],
    }
    assert out["train_epochs"][:8] == out["args"]["train"][:6] + ["--epochs", "3"]
    assert out["own_models"] == {"ingest": f"{root}/ingest/run={key}", "model": f"hdfs:///models/run={key}",
                                 "predictions": f"{root}/predictions/run={key}"}
    assert out["conf"] == {"spark.pyspark.driver.python": "/opt/venv/bin/python"}
    assert out["conf_packed"] == {"spark.pyspark.driver.python": "/opt/venv/bin/python",
                                  "spark.pyspark.python": "./env/bin/python",
                                  "spark.archives": "hdfs:///apps/pixelmill-env.tar.gz#env"}


# --- flags come from the CLI's own parser -------------------------------------------------

PARAMS = {"input_uri": "file:///in", "output_root": "s3a://bucket/runs/", "model_root": None, "num_proc": 4,
          "epochs": None, "score_split": "test", "config_files": ["cluster.yaml", "gpu.yaml"],
          "overrides": ["train.batch_size=32", "ingest.image_size=64"]}
RUN = SimpleNamespace(run_after=datetime(2026, 11, 28, 15, 30, 5, tzinfo=timezone.utc))


@pytest.mark.parametrize("stage", cli.STAGES)
@pytest.mark.parametrize("changes", [{}, {"epochs": 3, "model_root": "hdfs:///models/", "score_split": "unlabeled",
                                          "config_files": [], "overrides": [], "input_list": "s3a://b/lists/new.parquet"}],
                         ids=["defaults", "every-option"])
def test_rendered_flags_parse_back_to_the_same_values(stage, changes):
    params = dict(PARAMS, **changes)
    values = orch.stage_values(stage, params, RUN)
    parser = cli.build_parser(stage)
    parsed = vars(parser.parse_args(orch.stage_args(stage, params, RUN)))
    assert {k: parsed[k] for k in values} == {k: parser.get_default(k) if v is None else v for k, v in values.items()}
    # Not rendered: the log level, and the data version (a scheduled run reads the ingest it just committed).
    unrendered = {"log_level": "INFO", **({"data_version": None} if stage in ("train", "score") else {})}
    assert {k: v for k, v in parsed.items() if k not in values} == unrendered
    assert parsed["mode"] == orch.STAGE_MODES[stage]
    assert parsed["config"] == params["config_files"] and parsed["overrides"] == params["overrides"]


def test_score_renders_every_split_the_cli_accepts():
    # The DAG's hand-written flags once lacked "unlabeled": now both read one tuple.
    assert cli.SPLIT_CHOICES == ("train", "val", "test", "unlabeled", "all")
    assert orch.flag_choices("score", "split") == cli.SPLIT_CHOICES
    for split in cli.SPLIT_CHOICES:
        args = orch.stage_args("score", dict(PARAMS, score_split=split), RUN)
        assert args[args.index("--split") + 1] == split
        assert cli.parse_args("score", args).split == split


def test_score_stage_checks_the_same_split_choices():
    score = pytest.importorskip("pipeline.score", reason="the score stage has not landed yet")
    assert score.SPLIT_CHOICES == cli.SPLIT_CHOICES
    assert score.MODE_CHOICES == cli.SCORE_MODES


def test_dag_score_split_param_offers_the_cli_choices(parsed):
    assert parsed["score_split_enum"] == list(cli.SPLIT_CHOICES)


@pytest.mark.parametrize("stage, values, flag", [
    ("score", {"data": "d", "model": "m", "output": "o", "split": "dev"}, "--split"),
    ("ingest", {"input": "i", "output": "o", "mode": "resume"}, "--mode"),
    ("train", {"data": "d", "model_dir": "m", "num_proc": "four"}, "--num-proc"),
    ("train", {"data": "d", "model_dir": "m", "num_proc": 2.5}, "--num-proc"),
    ("ingest", {"input": "i", "output": "o", "model_dir": "m"}, "'model_dir'"),
    ("train", {"data": "d", "epochs": 1}, "--model-dir"),
    ("ingest", {"input": "i", "output": "o", "config": "cluster.yaml"}, "--config"),
])
def test_render_flags_refuses_what_the_cli_would_refuse(stage, values, flag):
    with pytest.raises(ValueError, match=re.escape(flag)):
        orch.render_flags(stage, values)


# --- nothing touches the filesystem at parse time; the task finds its job and spark-submit ---

FS_PROBE = """
    import json, os, pathlib, shutil, sys
    ours, repo = (%r, %r), %r
    calls = []

    def spy(owner, name):
        real = getattr(owner, name)
        def wrapper(*args, **kwargs):
            caller = sys._getframe(1)
            if caller.f_code.co_filename.startswith(ours):
                calls.append(f"{name} from {os.path.relpath(caller.f_code.co_filename, repo)}:{caller.f_lineno}")
            return real(*args, **kwargs)
        setattr(owner, name, wrapper)

    for owner, names in ((pathlib.Path, ("exists", "is_file", "is_dir", "is_symlink", "resolve", "stat", "iterdir",
                                         "glob", "open", "read_text")),
                         (os.path, ("exists", "isfile", "isdir", "islink", "realpath")),
                         (os, ("stat", "lstat", "listdir", "scandir", "access", "open")),
                         (shutil, ("which",))):
        for name in names:
            spy(owner, name)
    from airflow.dag_processing.dagbag import DagBag
    bag = DagBag(dag_folder=ours[1])
    print("RESULT " + json.dumps({"import_errors": {str(k): str(v) for k, v in bag.import_errors.items()},
                                  "dag_ids": sorted(bag.dag_ids), "calls": calls}))
""" % (str(REPO / "pipeline"), str(DAGS), str(REPO))


def test_parsing_the_dag_touches_no_file(tmp_path):
    # Probes of the jobs dir or spark-submit (Path.is_file, shutil.which, resolve...) belong in execute.
    out = run_py(FS_PROBE, tmp_path)
    assert out["import_errors"] == {} and out["dag_ids"] == ["pixelmill"]
    assert out["calls"] == []


OPERATOR_PROBE = """
    import json, os, sys
    from datetime import datetime, timezone
    from types import SimpleNamespace
    from airflow.dag_processing.dagbag import DagBag
    from airflow.sdk.exceptions import AirflowFailException
    dag = DagBag(dag_folder=%r).dags["pixelmill"]
    params = {"input_uri": "file:///in", "output_root": "file:///runs", "model_root": None, "num_proc": 2,
              "epochs": None, "score_split": "dev", "config_files": [], "overrides": [], "archives": None,
              "executor_python": None, "driver_python": None}
    run = SimpleNamespace(run_after=datetime(2026, 11, 28, tzinfo=timezone.utc))
    out = {}

    def attempt(name, call):
        try:
            call()
            out[name] = None
        except AirflowFailException as e:
            out[name] = str(e)

    score, train, ingest = (dag.get_task(t) for t in ("score", "train", "ingest"))
    attempt("bad_split", lambda: score.render_template_fields({"params": params, "dag_run": run}, dag.get_template_env()))
    attempt("no_run_after", lambda: train.render_template_fields(
        {"params": params, "dag_run": SimpleNamespace(run_after=None)}, dag.get_template_env()))
    os.environ["PIXELMILL_JOBS_DIR"] = sys.argv[1]
    attempt("no_job", lambda: ingest.execute({}))
    print("RESULT " + json.dumps(out))
""" % str(DAGS)


def test_operator_fails_without_retry_when_a_retry_cannot_help(tmp_path):
    # AirflowFailException is what Airflow does not retry: bad params and a missing job must raise it.
    empty = tmp_path / "no_jobs_here"
    empty.mkdir()
    code = OPERATOR_PROBE.replace("sys.argv[1]", repr(str(empty)))
    out = run_py(code, tmp_path / "home")
    assert out["bad_split"].startswith("score cannot render its command (pixelmill score: --split must be one of "
                                       "train, val, test, unlabeled, all (got 'dev')): not retried")
    assert "dag_run.run_after is not set" in out["no_run_after"] and "not retried" in out["no_run_after"]
    assert f"{empty / 'ingest.py'} does not exist: set PIXELMILL_JOBS_DIR" in out["no_job"]


def test_jobs_dir_is_resolved_when_the_task_runs(tmp_path, monkeypatch):
    # A DAG file symlinked into Airflow's dags folder: parse time only names a path, the task follows the link.
    monkeypatch.delenv("PIXELMILL_JOBS_DIR", raising=False)
    checkout = tmp_path / "checkout"
    (checkout / "airflow_dags").mkdir(parents=True)
    (checkout / "jobs").mkdir()
    (checkout / "airflow_dags" / "pixelmill.py").write_text("")
    (checkout / "jobs" / "train.py").write_text("")
    dags = tmp_path / "airflow" / "dags"
    dags.mkdir(parents=True)
    (dags / "pixelmill.py").symlink_to(checkout / "airflow_dags" / "pixelmill.py")
    dag_file = str(dags / "pixelmill.py")
    assert orch.job_path("train", dag_file) == str(tmp_path / "airflow" / "jobs" / "train.py")
    assert orch.resolve_job_path("train", dag_file) == str((checkout / "jobs" / "train.py").resolve())
    with pytest.raises(ValueError, match="score.py does not exist: set PIXELMILL_JOBS_DIR"):
        orch.resolve_job_path("score", dag_file)
    monkeypatch.setenv("PIXELMILL_JOBS_DIR", str(checkout / "jobs"))
    assert orch.job_path("train", "/anywhere/dags/pixelmill.py") == str(checkout / "jobs" / "train.py")
    assert orch.resolve_job_path("train", "/anywhere/dags/pixelmill.py") == str(checkout / "jobs" / "train.py")


def test_spark_submit_is_resolved_when_the_task_runs(tmp_path, monkeypatch):
    beside = tmp_path / "venv" / "bin" / "spark-submit"
    on_path = tmp_path / "path" / "spark-submit"
    on_path.parent.mkdir()
    on_path.write_text("#!/bin/sh\n")
    on_path.chmod(0o755)
    monkeypatch.setenv("PATH", str(on_path.parent))
    assert orch.resolve_spark_submit(str(beside)) == str(on_path)  # no venv binary: PATH's
    beside.parent.mkdir(parents=True)
    beside.write_text("")
    assert orch.resolve_spark_submit(str(beside)) == str(beside)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert orch.resolve_spark_submit(str(tmp_path / "none")) == "spark-submit"  # the hook's error names it
    assert orch.default_spark_submit() == str(BIN / "spark-submit")


# --- dag.test(): real spark-submit runs on local[2] ----------------------------------------

DAG_TEST = """
    import json, sys
    from datetime import datetime, timezone
    from airflow.dag_processing.dagbag import DagBag
    dag = DagBag(dag_folder=%r).dags["pixelmill"]
    conf = json.loads(sys.argv[1])
    logical = None if sys.argv[2] == "none" else datetime.fromisoformat(sys.argv[2])
    dr = dag.test(run_conf=conf, logical_date=logical)
    tis = {ti.task_id: {"state": str(ti.state), "try_number": ti.try_number} for ti in dr.get_task_instances()}
    print("RESULT " + json.dumps({"state": str(dr.state), "run_after": dr.run_after.isoformat(),
                                  "logical_date": dr.logical_date.isoformat() if dr.logical_date else None,
                                  "tis": tis}))
""" % str(DAGS)


@pytest.fixture(scope="module")
def airflow_home(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("airflow_home")
    p = subprocess.run([str(BIN / "airflow"), "db", "migrate"], env=airflow_env(home), cwd=home,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return home


def dag_test(home: Path, conf: dict, logical_date: str = "none", timeout: float = 900) -> dict:
    code = textwrap.dedent(DAG_TEST)
    p = subprocess.run([sys.executable, "-c", code, json.dumps(conf), logical_date], env=airflow_env(home),
                       cwd=home, capture_output=True, text=True, timeout=timeout)
    lines = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
    assert p.returncode == 0 and lines, f"exit {p.returncode}\n{p.stdout[-6000:]}\n{p.stderr[-6000:]}"
    out = json.loads(lines[-1][len("RESULT "):])
    out["log"] = p.stdout + p.stderr
    return out


def run_key_of(run_after_iso: str) -> str:
    from datetime import datetime, timezone

    return datetime.fromisoformat(run_after_iso).astimezone(timezone.utc).strftime("%Y%m%dT%H%M%SZ")


@pytest.mark.slow
def test_config_error_fails_the_run_without_retries(airflow_home, tmp_path):
    # Exit code 2 (bad config) cannot be fixed by retrying: the task fails on its first try.
    out = dag_test(airflow_home, {"input_uri": f"file://{tmp_path}/raw", "output_root": f"file://{tmp_path}/runs",
                                  "overrides": ["train.epochs=0"]})
    assert out["state"] == "failed"
    assert out["logical_date"] is None
    assert out["tis"] == {"ingest": {"state": "failed", "try_number": 1},
                          "train": {"state": "upstream_failed", "try_number": 0},
                          "score": {"state": "upstream_failed", "try_number": 0}}
    assert "config key 'train.epochs'" in out["log"]
    assert "not retried" in out["log"]
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_dag_runs_ingest_train_score_on_local_spark(airflow_home, raw_sample, tmp_path):
    pytest.importorskip("pipeline.train", reason="the train stage has not landed yet")
    pytest.importorskip("pipeline.score", reason="the score stage has not landed yet")
    runs = tmp_path / "runs"
    conf = {
        "input_uri": f"file://{raw_sample}",
        "output_root": f"file://{runs}",
        "num_proc": 2,
        "epochs": 1,
        "config_files": ["local.yaml"],
        "overrides": ["spark.ui_enabled=false", "spark.log_level=ERROR", *SAMPLE_INGEST_OVERRIDES,
                      "train.batch_size=16", "train.intra_op_threads=1", "train.inter_op_threads=1",
                      "loader.workers_count=1", "loader.shuffle_buffer=256"],
    }
    out = dag_test(airflow_home, conf, "none")  # a manual/API trigger: logical_date is None
    assert out["logical_date"] is None
    assert out["state"] == "success", out["log"][-8000:]
    assert {t: s["state"] for t, s in out["tis"].items()} == {"ingest": "success", "train": "success",
                                                              "score": "success"}
    key = run_key_of(out["run_after"])
    ingest, model, preds = runs / "ingest" / f"run={key}", runs / "models" / f"run={key}", runs / "predictions" / f"run={key}"
    assert sorted(p.name for p in runs.iterdir()) == ["ingest", "models", "predictions"]
    manifest = json.loads((version_dir(ingest) / "_manifest.json").read_text())
    assert manifest["accepted"] == 144 and manifest["files_seen"] == 144
    model_json = json.loads((model / "model.json").read_text())
    assert (model / "model" / "model.keras").is_file()
    assert model_json["epochs_completed"] == 1
    assert sorted(model_json["classes"]) == ["diagonal", "horizontal", "vertical"]
    assert (version_dir(preds) / "_metrics.json").is_file()
    import pyarrow.parquet as pq

    table = pq.read_table(str(version_dir(preds) / "predictions"))
    assert table.num_rows == manifest["splits"]["test"]
    assert set(table.column("model_id").to_pylist()) == {model_json["model_id"]}
