"""Liveness and epoch lines from rank 0 to the driver: ``<model_dir>/_progress.json``.

Horovod forwards process output to the driver in 64 KB chunks, too late for a watchdog,
so rank 0 rewrites a small JSON file (atomically) at most every few seconds after steps
complete, and at each epoch's end with the epoch's log line (:class:`Heartbeat`). The
driver polls it (:class:`ProgressReader`): a new ``seq`` is a beat, new epoch lines are
logged. :class:`Watchdog` runs beside ``horovod.spark.run`` and, when the beats stop for
longer than ``train.step_timeout`` (or never start within ``train.start_timeout +
train.step_timeout``), cancels the Spark job group and, if Horovod has still not returned
after a grace period, interrupts the driver's main thread.

Both sides open the model-dir through :func:`pipeline.fs.filesystem` (pyarrow), so the
watchdog thread makes no Py4J calls.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from typing import TYPE_CHECKING, Callable, List, Optional

from pipeline.contracts import PROGRESS_FILE
from pipeline.fs import join

if TYPE_CHECKING:  # pragma: no cover
    from pipeline.fs import FileSystem

log = logging.getLogger(__name__)

#: Seconds the watchdog waits for Horovod's own shutdown after it cancelled the job.
CANCEL_GRACE_S = 30.0


class Heartbeat:
    """Rank 0's writer of the progress file; on other ranks (``fs=None``) every beat is a no-op."""

    def __init__(self, fs: Optional["FileSystem"], model_dir: str, run_id: str, every_s: float = 2.0) -> None:
        self.fs, self.uri, self.run_id, self.every_s = fs, join(model_dir, PROGRESS_FILE), run_id, every_s
        self.last = 0.0
        self.seq = 0
        self.epoch_lines: List[str] = []

    def beat(self, what: str, force: bool = False, epoch_line: Optional[str] = None) -> None:
        if self.fs is None:
            return
        if epoch_line:
            self.epoch_lines = (self.epoch_lines + [epoch_line])[-50:]
        now = time.monotonic()
        if not (force or now - self.last >= self.every_s):
            return
        self.last = now
        self.seq += 1
        payload = {"run_id": self.run_id, "seq": self.seq, "what": what, "unix": time.time(),
                   "epoch_lines": self.epoch_lines}
        try:
            self.fs.write_text(self.uri, json.dumps(payload))
        except Exception as e:  # noqa: BLE001 - progress must never kill training
            log.warning("could not write %s: %s", self.uri, e)


class ProgressReader:
    """The driver's view of the progress file: the time of the last beat, epoch lines logged."""

    def __init__(self, fs: "FileSystem", model_dir: str, run_id: str) -> None:
        self.fs, self.uri, self.run_id = fs, join(model_dir, PROGRESS_FILE), run_id
        self.seq = -1
        self.logged = 0
        self.last_beat: Optional[float] = None

    def clear(self) -> None:
        self.fs.delete(self.uri)

    def poll(self) -> None:
        try:
            if not self.fs.exists(self.uri):
                return
            data = self.fs.read_json(self.uri)
        except Exception:  # noqa: BLE001 - half-visible file on an eventually consistent store
            return
        if data.get("run_id") != self.run_id or data.get("seq") == self.seq:
            return
        self.seq = data["seq"]
        self.last_beat = time.monotonic()
        lines = data.get("epoch_lines") or []
        for line in lines[self.logged:]:
            log.info("%s", line)
        self.logged = len(lines)


class Watchdog:
    """A daemon thread that polls ``progress`` and calls ``cancel`` when training goes silent.

    Use as a context manager around the blocking launch; ``reason`` is set when it fired.
    """

    def __init__(self, progress: ProgressReader, *, start_timeout: int, step_timeout: int, model_dir: str,
                 group: str, cancel: Callable[[], None], interrupt: Callable[[], None]) -> None:
        self.progress, self.start_timeout, self.step_timeout = progress, start_timeout, step_timeout
        self.model_dir, self.group, self.cancel, self.interrupt = model_dir, group, cancel, interrupt
        self.reason: Optional[str] = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="pixelmill-train-watchdog", daemon=True)

    def __enter__(self) -> "Watchdog":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self.progress.poll()  # the epoch lines written since the last poll

    def _silence(self, started: float) -> Optional[str]:
        now = time.monotonic()
        last = self.progress.last_beat
        if last is None and now - started > self.start_timeout + self.step_timeout:
            return (f"no training progress within train.start_timeout + train.step_timeout = "
                    f"{self.start_timeout + self.step_timeout}s of the launch: a Horovod process is stuck or "
                    "dead (raise train.start_timeout if the cluster is slow to start)")
        if last is not None and now - last > self.step_timeout:
            return (f"no training progress for train.step_timeout={self.step_timeout}s: a Horovod process is "
                    "stuck or dead (raise train.step_timeout if one step or one validation legitimately "
                    f"takes longer). Rerun with the same --model-dir {self.model_dir} to resume")
        return None

    def _watch(self) -> None:
        started = time.monotonic()
        while not self._done.wait(1.0):
            self.progress.poll()
            reason = self._silence(started)
            if reason is None:
                continue
            self.reason = reason
            log.error("%s; cancelling Spark job group %s", reason, self.group)
            self.cancel()
            if not self._done.wait(CANCEL_GRACE_S):
                log.error("Horovod did not stop %ds after the cancel: interrupting the driver", CANCEL_GRACE_S)
                self.interrupt()
            return

