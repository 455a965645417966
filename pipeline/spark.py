"""The one place a SparkSession is built.

Everything else receives the session as an argument. Under ``spark-submit``
the master and confs given on the command line win over the config's
``spark.master``; under ``python -m pipeline`` the config's master is used.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from typing import TYPE_CHECKING, Any, Dict, Iterator, Mapping, Optional

from pipeline.config import SparkConfig, redact_conf
from pipeline.errors import ConfigError, PixelmillError

if TYPE_CHECKING:  # pragma: no cover
    from pyspark.sql import SparkSession

log = logging.getLogger(__name__)

#: Defaults for a small machine; ``spark.conf`` in the config overrides them.
SMALL_MACHINE_DEFAULTS: Dict[str, str] = {
    "spark.sql.shuffle.partitions": "8",
    # The default 4 MB open cost turns thousands of small images into dozens of tasks.
    "spark.sql.files.openCostInBytes": "262144",
    "spark.sql.execution.arrow.pyspark.enabled": "true",
    "spark.sql.execution.arrow.pyspark.fallback.enabled": "false",
    "spark.sql.parquet.compression.codec": "snappy",
    "spark.sql.sources.partitionOverwriteMode": "static",
    "spark.driver.memory": "4g",
    "spark.python.worker.reuse": "true",
    "spark.sql.session.timeZone": "UTC",
}


def is_local_master(master: Optional[str]) -> bool:
    return bool(master) and (master == "local" or master.startswith("local["))


def under_spark_submit() -> bool:
    """True when this Python process was started by ``spark-submit``."""
    return "PYSPARK_GATEWAY_PORT" in os.environ


def session_confs(cfg: SparkConfig, master: Optional[str]) -> Dict[str, str]:
    """The confs pixelmill sets for ``master`` (pure: no JVM needed)."""
    confs = dict(SMALL_MACHINE_DEFAULTS)
    confs["spark.ui.enabled"] = "true" if cfg.ui_enabled else "false"
    if is_local_master(master):
        # Keep every socket on loopback: otherwise Spark picks another interface.
        confs["spark.driver.host"] = "127.0.0.1"
        confs["spark.driver.bindAddress"] = "127.0.0.1"
        # Executors of a local master run this very interpreter (the venv), not python3 from PATH.
        confs["spark.pyspark.python"] = sys.executable
        confs["spark.pyspark.driver.python"] = sys.executable
        # Local files without ChecksumFileSystem: no .crc lookup per file (a 20,000-file read pass
        # went from 3.9 s to 1.5 s) and no .crc files beside outputs. Local masters only.
        confs["spark.hadoop.fs.file.impl"] = "org.apache.hadoop.fs.RawLocalFileSystem"
    confs.update(cfg.conf)
    return confs


def build_session(cfg: SparkConfig, *, app_suffix: str = "") -> "SparkSession":
    """Build (or get) the SparkSession described by ``cfg``.

    Parameters
    ----------
    cfg:
        The ``spark`` section of the config.
    app_suffix:
        Appended to the app name, e.g. the stage (``pixelmill-ingest``).
    """
    assert_on_driver()
    from pyspark.sql import SparkSession

    submitted = under_spark_submit()
    if submitted:
        from pyspark import SparkConf

        master = SparkConf().get("spark.master", None)
    else:
        master = cfg.master
        if master is None:
            raise ConfigError("config key 'spark.master' is null: run the job with spark-submit --master ... or set spark.master")
    if is_local_master(master):
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
        os.environ["PYSPARK_PYTHON"] = sys.executable
        os.environ["PYSPARK_DRIVER_PYTHON"] = sys.executable

    builder = SparkSession.builder.appName(cfg.app_name + (f"-{app_suffix}" if app_suffix else ""))
    if not submitted:
        builder = builder.master(master)
    confs = session_confs(cfg, master)
    for k, v in confs.items():
        builder = builder.config(k, v)
    try:
        spark = builder.getOrCreate()
    except Exception as e:  # JVM missing, port in use, ...
        raise PixelmillError(f"could not start Spark (master {master}): {str(e).splitlines()[0]}") from e
    spark.sparkContext.setLogLevel(cfg.log_level)
    log.info("Spark %s on %s (%s)", spark.version, spark.sparkContext.master,
             ", ".join(f"{k}={v}" for k, v in sorted(redact_conf(cfg.conf).items())) or "no extra confs")
    return spark


def assert_on_driver() -> None:
    """Refuse to run driver-only code inside a Spark task."""
    from pyspark import TaskContext

    if TaskContext.get() is not None:
        raise PixelmillError("this function runs on the Spark driver only, not inside a task")


def task_slots(spark: "SparkSession") -> int:
    """Concurrent task slots the cluster offers now (cores / task cpus)."""
    sc = spark.sparkContext
    cpus = int(sc.getConf().get("spark.task.cpus", "1"))
    try:
        infos = sc._jsc.sc().statusTracker().getExecutorInfos()  # noqa: SLF001
        n_exec = max(0, len(infos) - 1)  # the driver is listed too
    except Exception:  # pragma: no cover - API drift
        n_exec = 0
    if is_local_master(sc.master) or n_exec == 0:
        return max(1, sc.defaultParallelism // cpus)
    cores = int(sc.getConf().get("spark.executor.cores", "1"))
    return max(1, n_exec * (cores // cpus))


def wait_for_task_slots(spark: "SparkSession", needed: int, timeout_s: float, poll_s: float = 1.0) -> int:
    """:func:`task_slots`, waiting up to ``timeout_s`` on a cluster until ``needed`` are registered.

    Executors register one by one after the application starts (each may first unpack a large
    ``--archives`` environment), so a count taken at once can be short on a cluster that will
    have the slots seconds later. Local masters have all their slots at once: no wait.
    Returns the last count, which may still be below ``needed`` when the time is up.
    """
    slots = task_slots(spark)
    if slots >= needed or is_local_master(spark.sparkContext.master):
        return slots
    log.info("waiting up to %.0fs for executors: %d of %d task slots registered", timeout_s, slots, needed)
    deadline = time.monotonic() + timeout_s
    while slots < needed and time.monotonic() < deadline:
        time.sleep(poll_s)
        slots = task_slots(spark)
    return slots


@contextlib.contextmanager
def progress(spark: "SparkSession", what: str, every_s: float = 10.0, *, counter: Any = None,
             total: Optional[int] = None, unit: str = "files") -> Iterator[None]:
    """Log progress every ``every_s`` seconds while the block runs.

    A driver thread reads Spark's status tracker (the task counts the Spark UI shows) and, when
    given, ``counter``: an accumulator the tasks add their item counts to (its value grows as
    tasks finish), logged as ``n[/total] <unit>, <rate> <unit>/s``. Retried or recomputed tasks
    add again: the figure shows movement, the accounting counts come from the data.
    """
    import threading

    stop = threading.Event()
    t0 = time.monotonic()

    def loop() -> None:
        st = spark.sparkContext.statusTracker()
        while not stop.wait(every_s):
            try:
                stages = [i for i in (st.getStageInfo(s) for s in st.getActiveStageIds()) if i is not None]
                n = int(counter.value) if counter is not None else None
            except Exception:  # noqa: BLE001 - the session is stopping: progress is best effort
                return
            took = time.monotonic() - t0
            parts = []
            if n is not None:
                parts.append(f"{n:,}{f'/{total:,}' if total is not None else ''} {unit}, {n / took:,.0f} {unit}/s")
            parts.extend(f"stage {i.stageId} {i.numCompletedTasks}/{i.numTasks} tasks done, {i.numActiveTasks} running"
                         for i in sorted(stages, key=lambda i: i.stageId))
            if parts:
                log.info("%s: %s, %.0fs", what, "; ".join(parts), took)

    thread = threading.Thread(target=loop, name="pixelmill-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


def set_job_description(spark: "SparkSession", text: str) -> None:
    spark.sparkContext.setJobDescription(text)


@contextlib.contextmanager
def temporary_confs(spark: "SparkSession", confs: Mapping[str, str]) -> Iterator[None]:
    """Set SQL confs for the duration of the block, then restore what was there."""
    old = {k: spark.conf.get(k, None) for k in confs}
    try:
        for k, v in confs.items():
            spark.conf.set(k, v)
        yield
    finally:
        for k, v in old.items():
            if v is None:
                spark.conf.unset(k)
            else:
                spark.conf.set(k, v)
