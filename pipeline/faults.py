"""Test-only fault injection: one mechanism, one line at each injection point.

A fault is armed on the driver with the environment variable
``PIXELMILL_FAULT_INJECT='<point>:<action>[:once][:<key>=<int>]...'``, e.g.
``ingest.batch:kill:once`` or ``train.step:kill:rank=1:epoch=2:step=3``.
:func:`armed` reads it once on the driver; the resulting :class:`FaultPlan` is
small and picklable and travels inside the task closure (or the Horovod spec),
so it reaches executors on any master. Each injection point is one line::

    if faults.fire(plan, "ingest.batch"):   # True only for the drop_row action
        ...

Points: ``ingest.batch`` (one Arrow batch of the ingest's per-image step),
``score.batch`` (after a scoring task's first output batch; context ``partition``,
``attempt``), ``train.step`` (context ``rank``, ``epoch``, ``step``), ``commit`` (on the driver, at
each step of a versioned commit, context ``step``: see :meth:`pipeline.snapshots.VersionWriter.commit`).
Actions: ``raise`` (RuntimeError), ``kill`` (SIGKILL of the process), ``exit``
(``os._exit(17)``), ``hang`` (alive but silent), ``drop_row`` (the caller drops one row).
``once`` fires the first time only, across processes: the firing process creates the
marker file ``PIXELMILL_FAULT_MARKER`` (default: a fresh temporary path) exclusively.
Every other ``key=value`` must equal the context the point passes.
With the variable unset, :func:`armed` returns None and :func:`fire` costs one comparison.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from typing import Dict, Optional

from pipeline.errors import ConfigError

log = logging.getLogger(__name__)

ENV = "PIXELMILL_FAULT_INJECT"
MARKER_ENV = "PIXELMILL_FAULT_MARKER"
#: The injection points, each with what it interrupts (named in the injected error).
_WHAT = {"ingest.batch": "ingest", "score.batch": "scoring", "train.step": "training", "commit": "the commit"}
POINTS = tuple(_WHAT)
ACTIONS = ("raise", "kill", "exit", "hang", "drop_row")


@dataclass(frozen=True)
class FaultPlan:
    point: str
    action: str
    once: bool = False
    when: Dict[str, int] = field(default_factory=dict)
    marker: Optional[str] = None


def parse(text: str, marker: Optional[str] = None) -> FaultPlan:
    """``'train.step:kill:rank=1:epoch=2'`` -> a :class:`FaultPlan` (ConfigError naming the variable otherwise)."""
    point, _, rest = text.strip().partition(":")
    action, *opts = rest.split(":") if rest else [""]
    if point not in POINTS or action not in ACTIONS:
        raise ConfigError(f"{ENV}={text!r} is not a known fault: use <point>:<action>[:once][:key=int]... with a "
                          f"point of {', '.join(POINTS)} and an action of {', '.join(ACTIONS)}")
    once, when = False, {}
    for o in opts:
        if o == "once":
            once = True
            continue
        k, eq, v = o.partition("=")
        try:
            when[k] = int(v)
        except ValueError:
            raise ConfigError(f"{ENV}={text!r}: {o!r} is not 'once' or key=<int>") from None
        if not eq or not k:
            raise ConfigError(f"{ENV}={text!r}: {o!r} is not 'once' or key=<int>")
    if once and marker is None:
        marker = os.path.join(tempfile.gettempdir(), f"pixelmill-fault-{uuid.uuid4().hex}")
    return FaultPlan(point, action, once, when, marker)


def armed() -> Optional[FaultPlan]:
    """The fault armed in this (driver) process's environment, or None."""
    text = os.environ.get(ENV, "").strip()
    if not text:
        return None
    plan = parse(text, os.environ.get(MARKER_ENV) or None)
    log.warning("fault injection armed: %s", text)
    return plan


def fire(plan: Optional[FaultPlan], point: str, **context: int) -> bool:
    """Inject ``plan``'s fault when it targets ``point`` and ``context``; True means: drop one row."""
    if plan is None or plan.point != point:
        return False
    if any(context.get(k) != v for k, v in plan.when.items()):
        return False
    if plan.once and plan.marker:
        try:
            os.close(os.open(plan.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return False
    log.warning("fault injection: %s at %s %s", plan.action, point, context or "")
    sys.stderr.flush()
    if plan.action == "raise":
        raise RuntimeError(f"{ENV}: injected {_WHAT[point]} fault at {point} {context or ''}".strip())
    if plan.action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if plan.action == "exit":
        os._exit(17)
    if plan.action == "hang":
        while True:  # alive but silent, like a stuck collective or a frozen node
            time.sleep(3600)
    return plan.action == "drop_row"
