"""Airflow 3 DAG: ingest -> train -> score, each a ``spark-submit`` of ``jobs/<stage>.py``.

Wiring only: this file imports no Spark, TensorFlow or pixelmill code and does no
I/O when the scheduler parses it. Everything that depends on the run (URIs, run
key, Spark confs) is rendered when a task starts.

Outputs of one DAG run live under one run key, derived from ``dag_run.run_after``
(set for scheduled, manual and API triggers alike; ``logical_date`` is None for
the last two in Airflow 3)::

    <output_root>/ingest/run=<key>/        jobs/ingest.py --mode overwrite
    <model_root>/run=<key>/                jobs/train.py  --mode resume  (default <output_root>/models)
    <output_root>/predictions/run=<key>/   jobs/score.py  --mode overwrite

so a retry or a re-run of the same DAG run rewrites (or resumes) its own
partition and never touches another run's.

Deployment knobs (environment of the scheduler and workers):

``PIXELMILL_JOBS_DIR``
    folder holding ``ingest.py``, ``train.py``, ``score.py`` (default: ``jobs/``
    next to this file's parent, i.e. a checkout of the repository).
``PIXELMILL_INPUT_URI`` / ``PIXELMILL_OUTPUT_ROOT``
    defaults of the ``input_uri`` / ``output_root`` params.
``PIXELMILL_SCHEDULE``
    cron or preset (default ``@daily``; ``none`` for manual/API triggers only).
``AIRFLOW_CONN_SPARK_DEFAULT``
    the Spark master, JSON form: ``{"conn_type": "spark", "host": "local[2]"}``
    or ``{"conn_type": "spark", "host": "spark://10.0.0.5", "port": 7077}``, or
    ``"yarn"``. (The URI form ``spark://local[2]`` silently becomes yarn.)
"""
from __future__ import annotations

import os
import re
import shutil
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator
from airflow.sdk import DAG, Param
from airflow.sdk.exceptions import AirflowFailException

DAG_ID = "pixelmill"
STAGES = ("ingest", "train", "score")
#: Exit codes of pixelmill jobs that no retry can fix (see pipeline/errors.py):
#: 2 = bad arguments or config, 3 = output exists.
NON_RETRYABLE_EXIT_CODES = {2: "bad arguments or config", 3: "the output already exists"}
#: How each stage writes its partition so that a retry is idempotent.
STAGE_MODES = {"ingest": "overwrite", "train": "resume", "score": "overwrite"}
#: Wall-clock limits per attempt; training gets the most.
EXECUTION_TIMEOUTS = {"ingest": timedelta(hours=2), "train": timedelta(hours=12), "score": timedelta(hours=2)}


def _jobs_dir() -> Path:
    env = os.environ.get("PIXELMILL_JOBS_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[1] / "jobs"


def _spark_submit_binary() -> str:
    """spark-submit next to the interpreter running Airflow (the venv), else from PATH."""
    beside = Path(sys.executable).parent / "spark-submit"
    if beside.is_file():
        return str(beside)
    return shutil.which("spark-submit") or "spark-submit"


def _schedule() -> Optional[str]:
    value = os.environ.get("PIXELMILL_SCHEDULE", "@daily").strip()
    return None if value.lower() in ("", "none", "null") else value


# --- macros: rendered when a task starts (the DAG renders natively, so these return lists/dicts) ---

def run_key(dag_run: Any) -> str:
    """``20261128T153000Z``: the run's ``run_after`` in UTC, safe in a path and sortable."""
    ts = getattr(dag_run, "run_after", None)
    if ts is None:  # a DagRun always has run_after; refuse rather than invent one
        raise AirflowFailException("dag_run.run_after is not set: cannot derive the run key")
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=timezone.utc)
    return ts.astimezone(timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def stage_uris(params: Mapping[str, Any], dag_run: Any) -> Dict[str, str]:
    """The run's three output URIs under ``params.output_root``."""
    root = str(params["output_root"]).rstrip("/")
    models = str(params.get("model_root") or f"{root}/models").rstrip("/")
    key = run_key(dag_run)
    return {
        "ingest": f"{root}/ingest/run={key}",
        "model": f"{models}/run={key}",
        "predictions": f"{root}/predictions/run={key}",
    }


def stage_args(stage: str, params: Mapping[str, Any], dag_run: Any) -> List[str]:
    """Command-line flags of ``jobs/<stage>.py`` for this run (all strings)."""
    uris = stage_uris(params, dag_run)
    if stage == "ingest":
        args = ["--input", str(params["input_uri"]), "--output", uris["ingest"]]
    elif stage == "train":
        args = ["--data", uris["ingest"], "--model-dir", uris["model"], "--num-proc", str(int(params["num_proc"]))]
        if params.get("epochs") is not None:
            args += ["--epochs", str(int(params["epochs"]))]
    elif stage == "score":
        args = ["--data", uris["ingest"], "--model", uris["model"], "--output", uris["predictions"],
                "--split", str(params["score_split"])]
    else:
        raise ValueError(f"unknown stage {stage!r}")
    args += ["--mode", STAGE_MODES[stage]]
    for f in params.get("config_files") or []:
        args += ["--config", str(f)]
    for kv in params.get("overrides") or []:
        args += ["--set", str(kv)]
    return args


def spark_conf(params: Mapping[str, Any]) -> Dict[str, str]:
    """Spark confs for spark-submit: which Python runs the driver and the executors."""
    # spark.pyspark.python would also be used by a client-mode driver, where a
    # relative ./env/bin/python does not exist: pin the driver's Python separately.
    conf = {"spark.pyspark.driver.python": str(params.get("driver_python") or sys.executable)}
    if params.get("executor_python"):
        conf["spark.pyspark.python"] = str(params["executor_python"])
    if params.get("archives"):
        conf["spark.archives"] = str(params["archives"])
    return conf


class PixelmillSubmitOperator(SparkSubmitOperator):
    """spark-submit that fails without retrying when the job says a retry cannot help."""

    def execute(self, context: Any) -> Any:
        try:
            return super().execute(context)
        except AirflowFailException:
            raise
        except Exception as e:  # the hook raises AirflowException("... Error code is: N.")
            m = re.search(r"Error code is: (\d+)", str(e))
            code = int(m.group(1)) if m else None
            if code in NON_RETRYABLE_EXIT_CODES:
                raise AirflowFailException(
                    f"{self.task_id} exited {code} ({NON_RETRYABLE_EXIT_CODES[code]}): not retried; "
                    "fix the params/config and clear the task (see the job's last stderr line)"
                ) from e
            raise


default_args = {
    "owner": "pixelmill",
    "retries": 2,
    "retry_delay": timedelta(minutes=2),
    "retry_exponential_backoff": 2.0,
    "max_retry_delay": timedelta(minutes=30),
}

with DAG(
    dag_id=DAG_ID,
    description="Raw images -> Parquet -> Horovod-on-Spark training -> batch predictions",
    schedule=_schedule(),
    start_date=datetime(2026, 1, 1, tzinfo=timezone.utc),
    catchup=False,
    max_active_runs=1,  # training takes every task slot of the cluster
    dagrun_timeout=timedelta(hours=18),
    default_args=default_args,
    render_template_as_native_obj=True,
    user_defined_macros={"run_key": run_key, "stage_uris": stage_uris, "stage_args": stage_args,
                         "spark_conf": spark_conf},
    params={
        "input_uri": Param(os.environ.get("PIXELMILL_INPUT_URI", "file:///data/pixelmill/raw"), type="string",
                           minLength=1, description="raw images: <input>/[<split>/]<label>/.../<file>"),
        "output_root": Param(os.environ.get("PIXELMILL_OUTPUT_ROOT", "file:///data/pixelmill/runs"),
                             type="string", minLength=1,
                             description="ingest/, models/, predictions/ go below, one run=<key> folder per run"),
        "model_root": Param(None, type=["null", "string"],
                            description="where models go, one run=<key> folder per run; null = <output_root>/models"),
        "num_proc": Param(2, type="integer", minimum=1, description="Horovod processes (needs as many task slots)"),
        "epochs": Param(None, type=["null", "integer"], minimum=1, description="null = train.epochs from config"),
        "score_split": Param("test", enum=["train", "val", "test", "all"]),
        "config_files": Param([], type="array", items={"type": "string"},
                              description="--config overlays, e.g. [\"cluster.yaml\"] (names resolve in conf/)"),
        "overrides": Param([], type="array", items={"type": "string"},
                           description="--set KEY=VALUE overrides, e.g. [\"train.batch_size=32\"]"),
        "archives": Param(None, type=["null", "string"],
                          description="packed env for executors, e.g. hdfs:///apps/pixelmill-env.tar.gz#env"),
        "executor_python": Param(None, type=["null", "string"],
                                 description="executors' Python, e.g. ./env/bin/python with archives"),
        "driver_python": Param(None, type=["null", "string"],
                               description="driver's Python (client mode); null = the Airflow worker's"),
    },
    tags=["pixelmill", "spark", "horovod"],
    doc_md=__doc__,
) as dag:
    tasks = {}
    for stage in STAGES:
        tasks[stage] = PixelmillSubmitOperator(
            task_id=stage,
            application=str(_jobs_dir() / f"{stage}.py"),
            application_args="{{ stage_args('%s', params, dag_run) }}" % stage,
            conf="{{ spark_conf(params) }}",
            name="pixelmill-%s-{{ run_key(dag_run) }}" % stage,
            conn_id="spark_default",
            spark_binary=_spark_submit_binary(),
            execution_timeout=EXECUTION_TIMEOUTS[stage],
        )
    tasks["ingest"] >> tasks["train"] >> tasks["score"]
