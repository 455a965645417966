"""A real Spark standalone cluster on 127.0.0.1 for tests: one master, N workers.

Started with the pip package's ``bin/spark-class`` (it has no start-master.sh).
Every daemon binds to 127.0.0.1 (``--host`` and ``SPARK_LOCAL_IP``), gets free
ports and its own work/log folders under a temp root, and runs in its own
process group so :meth:`StandaloneCluster.stop` also ends the executors and
Python workers it forked. :func:`standalone_cluster` always stops what it
started, also when start-up or the body fails.

Also runnable as a spark-submit application that proves Horovod's processes land
in different executors::

    spark-submit --master spark://127.0.0.1:PORT tests/cluster.py horovod-check
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
BIN = Path(sys.executable).parent


class ClusterError(RuntimeError):
    """The standalone cluster did not come up (the message names the daemon log to read)."""


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def loopback_env(extra: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """This process's environment, with the venv first on PATH and Spark pinned to loopback."""
    env = dict(os.environ)
    env["PATH"] = str(BIN) + os.pathsep + env.get("PATH", "")
    env["SPARK_LOCAL_IP"] = LOOPBACK
    env["SPARK_LOCAL_HOSTNAME"] = "localhost"
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # No inherited driver-side settings: each spark-submit says what it needs.
    for k in ("PYSPARK_GATEWAY_PORT", "PYSPARK_GATEWAY_SECRET", "SPARK_HOME", "PYTHONPATH"):
        env.pop(k, None)
    env.update(extra or {})
    return env


@dataclass
class Daemon:
    name: str
    proc: subprocess.Popen
    log_path: Path

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass
class StandaloneCluster:
    root: Path
    master_url: str = ""
    web_url: str = ""
    daemons: List[Daemon] = field(default_factory=list)
    worker_dirs: List[Path] = field(default_factory=list)

    def state(self) -> Dict[str, Any]:
        """The master's JSON status (workers, apps)."""
        with urllib.request.urlopen(self.web_url + "/json/", timeout=5) as r:  # loopback only
            return json.loads(r.read().decode())

    def alive_workers(self) -> int:
        try:
            return sum(1 for w in self.state().get("workers", []) if w.get("state") == "ALIVE")
        except OSError:
            return 0

    def logs(self, lines: int = 30) -> str:
        return "\n".join(f"--- {d.name} ({d.log_path}) ---\n{d.tail(lines)}" for d in self.daemons)

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM every daemon's process group (executors included), SIGKILL after ``grace_s``."""
        for d in reversed(self.daemons):
            _signal_group(d.proc, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for d in reversed(self.daemons):
            try:
                d.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            _signal_group(d.proc, signal.SIGKILL)  # stragglers in the group (executors, python workers)
            with contextlib.suppress(subprocess.TimeoutExpired):
                d.proc.wait(timeout=5)
        self.daemons.clear()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    # Each daemon was started with start_new_session=True: its pid is its group id.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def _spawn(name: str, cmd: Sequence[str], env: Mapping[str, str], log_dir: Path) -> Daemon:
    log_path = log_dir / f"{name}.log"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(list(cmd), env=dict(env), stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    return Daemon(name, proc, log_path)


def _wait(cond, timeout: float, what: str, cluster: StandaloneCluster) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        dead = [d.name for d in cluster.daemons if d.proc.poll() is not None]
        if dead:
            raise ClusterError(f"{', '.join(dead)} exited while waiting for {what}\n{cluster.logs()}")
        if cond():
            return
        time.sleep(0.5)
    raise ClusterError(f"timed out after {timeout:.0f}s waiting for {what}\n{cluster.logs()}")


@contextlib.contextmanager
def standalone_cluster(root: Path, *, workers: int = 2, cores_per_worker: int = 1,
                       memory_per_worker: str = "2g", timeout_s: float = 120.0) -> Iterator[StandaloneCluster]:
    """A master and ``workers`` workers on 127.0.0.1; stopped on exit, also on failure.

    Each worker offers ``cores_per_worker`` cores, so with one core each every
    executor holds one task slot and two concurrent tasks run in two executors.
    """
    spark_class = BIN / "spark-class"
    if not spark_class.is_file():
        raise ClusterError(f"{spark_class} not found: run make setup (the pyspark package ships bin/spark-class)")
    root = Path(root)
    log_dir = root / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    cluster = StandaloneCluster(root=root)
    try:
        port, web = free_port(), free_port()
        env = loopback_env({"SPARK_LOG_DIR": str(log_dir), "SPARK_PID_DIR": str(root / "pids"),
                            "SPARK_NO_DAEMONIZE": "1", "SPARK_DAEMON_MEMORY": "512m"})
        cluster.master_url = f"spark://{LOOPBACK}:{port}"
        cluster.web_url = f"http://{LOOPBACK}:{web}"
        cluster.daemons.append(_spawn("master", [str(spark_class), "org.apache.spark.deploy.master.Master",
                                                 "--host", LOOPBACK, "--port", str(port), "--webui-port", str(web)],
                                      env, log_dir))
        _wait(lambda: _http_ok(cluster.web_url + "/json/"), timeout_s, "the master's web UI", cluster)
        for i in range(workers):
            wdir = root / f"worker-{i}"
            wdir.mkdir(parents=True, exist_ok=True)
            cluster.worker_dirs.append(wdir)
            wenv = dict(env, SPARK_WORKER_DIR=str(wdir))
            cluster.daemons.append(_spawn(
                f"worker-{i}",
                [str(spark_class), "org.apache.spark.deploy.worker.Worker", "--host", LOOPBACK,
                 "--port", str(free_port()), "--webui-port", str(free_port()), "--cores", str(cores_per_worker),
                 "--memory", memory_per_worker, "--work-dir", str(wdir), cluster.master_url],
                wenv, log_dir))
        _wait(lambda: cluster.alive_workers() == workers, timeout_s, f"{workers} ALIVE workers", cluster)
        log.info("standalone cluster %s with %d workers", cluster.master_url, workers)
        yield cluster
    finally:
        cluster.stop()


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:  # loopback only
            return r.status == 200
    except OSError:
        return False


def spark_submit(args: Sequence[str], *, env: Optional[Mapping[str, str]] = None, timeout_s: float = 600,
                 cwd: Optional[Path] = None) -> subprocess.CompletedProcess:
    """Run ``spark-submit`` from the venv; on timeout its whole process group is killed."""
    cmd = [str(BIN / "spark-submit"), *args]
    proc = subprocess.Popen(cmd, env=dict(env or loopback_env()), cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _signal_group(proc, signal.SIGKILL)
        out, err = proc.communicate()
        err += f"\n[test harness] spark-submit killed after {timeout_s:.0f}s"
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


# --- spark-submit application: Horovod ranks in distinct executors --------------------

def _rank_report() -> Dict[str, Any]:
    """Runs in each Horovod process: the diagnostics check plus where this process runs."""
    from pipeline.diagnostics import horovod_allreduce_check

    out = horovod_allreduce_check()
    # The task service (and the Horovod process it forks) runs in its executor's work dir:
    # <SPARK_WORKER_DIR>/<app-id>/<executor-id>.
    out.update(cwd=os.getcwd(), pid=os.getpid(), python=sys.executable)
    return out


def _horovod_check_main(num_proc: int) -> int:
    import horovod.spark
    from pyspark.sql import SparkSession

    spark = SparkSession.builder.appName("pixelmill-cluster-horovod-check").getOrCreate()
    try:
        results = horovod.spark.run(_rank_report, num_proc=num_proc, start_timeout=180, nics=["lo"],
                                    use_gloo=True, verbose=0)
        print(json.dumps({"results": results}), flush=True)
        return 0
    finally:
        spark.stop()


if __name__ == "__main__":
    if sys.argv[1:2] == ["horovod-check"]:
        sys.exit(_horovod_check_main(int(sys.argv[2]) if len(sys.argv) > 2 else 2))
    print("usage: spark-submit tests/cluster.py horovod-check [NUM_PROC]", file=sys.stderr)
    sys.exit(2)
