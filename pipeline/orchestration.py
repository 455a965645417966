"""What ``airflow_dags/pixelmill.py`` runs, without Airflow: run keys, per-run URIs, job flags.

The DAG's templates call :func:`run_key`, :func:`stage_uris`, :func:`stage_args` and
:func:`spark_conf` when a task starts. Flags are rendered from
:func:`pipeline.cli.build_parser`, the parser the jobs themselves use, so the DAG
cannot pass a flag the CLI does not have or a value it would refuse.

This module imports neither Airflow nor Spark nor TensorFlow, and only the
``resolve_*`` functions touch the filesystem: the operator calls them when a task
runs, never while the scheduler parses the DAG. The Airflow side (operator,
macros, params) is :mod:`pipeline.orchestration_airflow`.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
from datetime import timezone
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

from pipeline.cli import STAGES, build_parser

#: Exit codes of pixelmill jobs that no retry can fix (see pipeline/errors.py).
NON_RETRYABLE_EXIT_CODES = {2: "bad arguments or config", 3: "the output already exists"}
#: How each stage writes its partition so that a retry is idempotent.
STAGE_MODES = {"ingest": "overwrite", "train": "resume", "score": "overwrite"}
#: Folder holding ``ingest.py``, ``train.py``, ``score.py``; default ``jobs/`` beside the DAG folder.
JOBS_DIR_ENV = "PIXELMILL_JOBS_DIR"
SCHEDULE_ENV = "PIXELMILL_SCHEDULE"
SPARK_SUBMIT = "spark-submit"


class OrchestrationError(ValueError):
    """A DAG run that cannot become a job's command line; retrying cannot help."""


# --- flags, from the CLI's own parser ---------------------------------------------------

def _flags(stage: str) -> Dict[str, argparse.Action]:
    """``pixelmill <stage>``'s options by ``dest`` (the parsed namespace's names), in parser order."""
    if stage not in STAGES:
        raise OrchestrationError(f"unknown stage {stage!r}: choose one of {', '.join(STAGES)}")
    return {a.dest: a for a in build_parser(stage)._actions
            if a.option_strings and not isinstance(a, argparse._HelpAction)}


def _long(action: argparse.Action) -> str:
    return max(action.option_strings, key=len)


def flag_choices(stage: str, dest: str) -> Tuple[Any, ...]:
    """The values ``pixelmill <stage>`` accepts for the option stored in ``dest``."""
    action = _flags(stage).get(dest)
    if action is None or action.choices is None:
        raise OrchestrationError(f"pixelmill {stage}: no option {dest!r} with a fixed set of values")
    return tuple(action.choices)


def _render_value(stage: str, action: argparse.Action, value: Any) -> str:
    flag, text = _long(action), str(value)
    try:  # argparse converts with type= first, then checks choices against the result
        converted = action.type(text) if callable(action.type) else text
    except argparse.ArgumentTypeError as e:  # the CLI's own message
        raise OrchestrationError(f"pixelmill {stage}: {e}") from e
    except (TypeError, ValueError) as e:
        kind = getattr(action.type, "__name__", "value")
        raise OrchestrationError(f"pixelmill {stage}: {flag} expects {kind} (got {value!r})") from e
    if action.choices is not None and converted not in action.choices:
        raise OrchestrationError(f"pixelmill {stage}: {flag} must be one of "
                                 f"{', '.join(map(str, action.choices))} (got {value!r})")
    return text


def render_flags(stage: str, values: Mapping[str, Any]) -> List[str]:
    """``["--flag", "value", ...]`` such that ``build_parser(stage).parse_args`` gives back ``values``.

    ``values`` is keyed like the namespace the parser returns (``model_dir``,
    ``num_proc``, ``config``, ``overrides``...). ``None`` leaves a flag out; a
    repeatable flag (``--config``, ``--set``) takes a list. Flags come in the
    parser's order. A key the parser does not know, a missing required flag, or a
    value its ``type``/``choices`` refuse raises :class:`OrchestrationError` naming the flag.
    """
    flags = _flags(stage)
    unknown = sorted(set(values) - set(flags))
    if unknown:
        raise OrchestrationError(f"pixelmill {stage}: no flag for {', '.join(map(repr, unknown))} "
                                 f"(it takes {', '.join(flags)})")
    args: List[str] = []
    for dest, action in flags.items():
        value = values.get(dest)
        if value is None:
            if action.required:
                raise OrchestrationError(f"pixelmill {stage}: {_long(action)} is required ({dest!r} is missing)")
            continue
        if isinstance(action, argparse._AppendAction):
            if not isinstance(value, (list, tuple)):
                raise OrchestrationError(f"pixelmill {stage}: {_long(action)} is repeatable, give {dest!r} "
                                         f"as a list (got {value!r})")
            items = list(value)
        elif action.nargs is None:
            items = [value]
        else:  # pragma: no cover - the CLI has no such option today
            raise OrchestrationError(f"pixelmill {stage}: {_long(action)} has nargs={action.nargs!r}, not rendered")
        for item in items:
            args += [_long(action), _render_value(stage, action, item)]
    return args


# --- macros: rendered when a task starts (the DAG renders natively, so these return lists/dicts) ---

def run_key(dag_run: Any) -> str:
    """``20261128T153000Z``: the run's ``run_after`` in UTC, safe in a path and sortable."""
    ts = getattr(dag_run, "run_after", None)
    if ts is None:  # a DagRun always has run_after; refuse rather than invent one
        raise OrchestrationError("dag_run.run_after is not set: cannot derive the run key")
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


def stage_values(stage: str, params: Mapping[str, Any], dag_run: Any) -> Dict[str, Any]:
    """The DAG params as ``pixelmill <stage>`` option values (see :func:`render_flags`)."""
    uris = stage_uris(params, dag_run)
    if stage == "ingest":
        values = {"input": params["input_uri"], "input_list": params.get("input_list"), "output": uris["ingest"]}
    elif stage == "train":
        values = {"data": uris["ingest"], "model_dir": uris["model"], "num_proc": params["num_proc"],
                  "epochs": params.get("epochs")}
    elif stage == "score":
        values = {"data": uris["ingest"], "model": uris["model"], "output": uris["predictions"],
                  "split": params["score_split"]}
    else:
        raise OrchestrationError(f"unknown stage {stage!r}: choose one of {', '.join(STAGES)}")
    return {**values, "mode": STAGE_MODES[stage], "config": list(params.get("config_files") or []),
            "overrides": list(params.get("overrides") or [])}


def stage_args(stage: str, params: Mapping[str, Any], dag_run: Any) -> List[str]:
    """Command-line flags of ``jobs/<stage>.py`` for this run (all strings)."""
    return render_flags(stage, stage_values(stage, params, dag_run))


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


# --- deployment: env knobs read at parse time, files looked up only when a task runs ---------

def dag_schedule() -> Optional[str]:
    """``PIXELMILL_SCHEDULE``: a cron or preset (default ``@daily``); ``none`` = triggers only."""
    value = os.environ.get(SCHEDULE_ENV, "@daily").strip()
    return None if value.lower() in ("", "none", "null") else value


def _jobs_dir(dag_file: str, *, resolve: bool) -> Path:
    env = os.environ.get(JOBS_DIR_ENV)
    if env:
        return Path(env)
    dag = Path(dag_file).resolve() if resolve else Path(os.path.abspath(dag_file))
    return dag.parents[1] / "jobs"


def job_path(stage: str, dag_file: str) -> str:
    """Where ``jobs/<stage>.py`` should be, computed from names only (safe at parse time)."""
    return str(_jobs_dir(dag_file, resolve=False) / f"{stage}.py")


def resolve_job_path(stage: str, dag_file: str) -> str:
    """``jobs/<stage>.py`` on this worker, following a symlinked DAG file to its checkout."""
    path = _jobs_dir(dag_file, resolve=True) / f"{stage}.py"
    if not path.is_file():
        raise OrchestrationError(f"{path} does not exist: set {JOBS_DIR_ENV} to the folder holding "
                                 f"{', '.join(s + '.py' for s in STAGES)}")
    return str(path)


def default_spark_submit() -> str:
    """spark-submit beside the interpreter running Airflow (the venv's bin/); not checked here."""
    return str(Path(sys.executable).parent / SPARK_SUBMIT)


def resolve_spark_submit(preferred: str) -> str:
    """``preferred`` if that file exists, else spark-submit from PATH (else the bare name)."""
    if Path(preferred).is_file():
        return preferred
    return shutil.which(SPARK_SUBMIT) or SPARK_SUBMIT


def job_exit_code(error: BaseException) -> Optional[int]:
    """The job's exit code from the Spark hook's error (``... Error code is: N.``), if it says one."""
    m = re.search(r"Error code is: (\d+)", str(error))
    return int(m.group(1)) if m else None
