"""Airflow 3 DAG: ingest -> train -> score, each a ``spark-submit`` of ``jobs/<stage>.py``.

Wiring only: parsing imports no Spark or TensorFlow and touches no file. What a
task runs is rendered when it starts, on the worker: run key, URIs and flags
(from the CLI's own parser) by ``pipeline.orchestration``; the job file and
spark-submit are found by the operator in ``pipeline.orchestration_airflow``.

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
    next to this file's parent, i.e. a checkout of the repository; checked when
    a task starts, a missing job fails without retrying).
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

from datetime import datetime, timedelta, timezone

from airflow.sdk import DAG, chain

from pipeline.orchestration import STAGES, dag_schedule
from pipeline.orchestration_airflow import MACROS, PixelmillSubmitOperator, dag_params

#: Wall-clock limits per attempt; training gets the most.
EXECUTION_TIMEOUTS = {"ingest": timedelta(hours=2), "train": timedelta(hours=12), "score": timedelta(hours=2)}

default_args = {
    "owner": "pixelmill",
    "retries": 2,
    "retry_delay": timedelta(minutes=2),
    "retry_exponential_backoff": 2.0,
    "max_retry_delay": timedelta(minutes=30),
}

with DAG(
    dag_id="pixelmill",
    description="Raw images -> Parquet -> Horovod-on-Spark training -> batch predictions",
    schedule=dag_schedule(),
    start_date=datetime(2026, 1, 1, tzinfo=timezone.utc),
    catchup=False,
    max_active_runs=1,  # training takes every task slot of the cluster
    dagrun_timeout=timedelta(hours=18),
    default_args=default_args,
    render_template_as_native_obj=True,
    user_defined_macros=MACROS,
    params=dag_params(),
    tags=["pixelmill", "spark", "horovod"],
    doc_md=__doc__,
) as dag:
    chain(*(
        PixelmillSubmitOperator(
            task_id=stage,
            stage=stage,
            dag_file=__file__,  # jobs/ is found from here when the task runs
            application_args="{{ stage_args('%s', params, dag_run) }}" % stage,
            conf="{{ spark_conf(params) }}",
            name="pixelmill-%s-{{ run_key(dag_run) }}" % stage,
            conn_id="spark_default",
            execution_timeout=EXECUTION_TIMEOUTS[stage],
        )
        for stage in STAGES
    ))
