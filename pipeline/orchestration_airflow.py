"""The Airflow side of :mod:`pipeline.orchestration`: the DAG's params, macros and operator.

Imported by ``airflow_dags/pixelmill.py``; needs the ``airflow`` extra. Like the
DAG file it imports no Spark or TensorFlow and touches no file at import or
parse time: :class:`PixelmillSubmitOperator` finds its job and spark-submit in
``execute``, on the worker that runs the task.
"""
from __future__ import annotations

import os
from typing import Any, Dict

from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator
from airflow.sdk import Param
from airflow.sdk.exceptions import AirflowFailException

from pipeline import orchestration as orch

#: ``user_defined_macros`` of the DAG: what its task templates call.
MACROS = {"run_key": orch.run_key, "stage_uris": orch.stage_uris, "stage_args": orch.stage_args,
          "spark_conf": orch.spark_conf}


def dag_params() -> Dict[str, Param]:
    """The DAG's params; :func:`pipeline.orchestration.stage_args` reads them by these names."""
    return {
        "input_uri": Param(os.environ.get("PIXELMILL_INPUT_URI", "file:///data/pixelmill/raw"), type="string",
                           minLength=1, description="raw images: <input>/[<split>/]<label>/.../<file>"),
        "input_list": Param(None, type=["null", "string"],
                            description="a Parquet/CSV list of path[,label[,split]] to ingest instead of listing "
                                        "input_uri (relative paths are below input_uri)"),
        "output_root": Param(os.environ.get("PIXELMILL_OUTPUT_ROOT", "file:///data/pixelmill/runs"),
                             type="string", minLength=1,
                             description="ingest/, models/, predictions/ go below, one run=<key> folder per run"),
        "model_root": Param(None, type=["null", "string"],
                            description="where models go, one run=<key> folder per run; null = <output_root>/models"),
        "num_proc": Param(2, type="integer", minimum=1, description="Horovod processes (needs as many task slots)"),
        "epochs": Param(None, type=["null", "integer"], minimum=1, description="null = train.epochs from config"),
        # the CLI's own --split choices, so the two cannot drift
        "score_split": Param("test", enum=list(orch.flag_choices("score", "split"))),
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
    }


class PixelmillSubmitOperator(SparkSubmitOperator):
    """spark-submit of ``jobs/<stage>.py`` that fails without retrying when a retry cannot help.

    At parse time ``application`` and the spark-submit binary are only names
    (``jobs/<stage>.py`` beside ``dag_file``'s folder or in ``PIXELMILL_JOBS_DIR``;
    ``spark-submit`` beside the running Python). ``execute`` resolves them on the
    worker: the DAG file's symlinks are followed, a missing job fails at once, and
    spark-submit falls back to PATH. The connection's ``spark-binary`` extra takes
    no path, so the binary is always passed here.
    """

    def __init__(self, *, stage: str, dag_file: str, **kwargs: Any) -> None:
        if stage not in orch.STAGES:
            raise ValueError(f"unknown stage {stage!r}: choose one of {', '.join(orch.STAGES)}")
        super().__init__(application=orch.job_path(stage, dag_file), spark_binary=orch.default_spark_submit(),
                         **kwargs)
        self.pixelmill_stage = stage
        self.pixelmill_dag_file = dag_file

    def _not_retried(self, what: str, see: str = "") -> AirflowFailException:
        return AirflowFailException(f"{self.task_id} {what}: not retried; fix the params/config and clear the task"
                                    + (f" (see {see})" if see else ""))

    def render_template_fields(self, context: Any, jinja_env: Any = None) -> None:
        try:
            super().render_template_fields(context, jinja_env)
        except orch.OrchestrationError as e:  # bad params: every retry would render the same
            raise self._not_retried(f"cannot render its command ({e})") from e

    def execute(self, context: Any) -> Any:
        try:
            self.application = orch.resolve_job_path(self.pixelmill_stage, self.pixelmill_dag_file)
        except orch.OrchestrationError as e:
            raise self._not_retried(f"cannot start ({e})") from e
        self._spark_binary = orch.resolve_spark_submit(self._spark_binary)
        self.log.info("pixelmill %s: %s via %s", self.pixelmill_stage, self.application, self._spark_binary)
        try:
            return super().execute(context)
        except AirflowFailException:
            raise
        except Exception as e:  # the hook raises AirflowException("... Error code is: N.")
            code = orch.job_exit_code(e)
            if code in orch.NON_RETRYABLE_EXIT_CODES:
                raise self._not_retried(f"exited {code} ({orch.NON_RETRYABLE_EXIT_CODES[code]})",
                                        see="the job's last stderr line") from e
            raise
