"""Accounting: every listed file counted once, as accepted (per split and class) or rejected (per reason).

The only Spark work here is :func:`group_counts`, one aggregation collected as one row per
(reason, split, label): bounded by classes, not by data. Everything else works on small dicts:
this run's :class:`RunCounts`, the output's :class:`Totals` (a prior manifest's added on
append), the class mapping, the train split's pixel stats and the invariants.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Tuple

from pipeline.config import IngestConfig
from pipeline.errors import DataError, InvariantError
from pipeline.imaging.clean import channel_mean_std
from pipeline.imaging.quality import FLAGS
from pipeline.imaging.reasons import ALREADY_INGESTED
from pipeline.ingest.extract import STAT_COLS

if TYPE_CHECKING:  # pragma: no cover
    from pyspark.sql import DataFrame, Row

    from pipeline.contracts import IngestManifest

log = logging.getLogger(__name__)


def group_counts(df: "DataFrame") -> List["Row"]:
    """Rows per (reason, split, label): ``n``, stored ``bytes``, pixel sums (``s*``, ``q*``), ``npix``
    and, per quality flag ``f``, ``flag_<f>`` (the images raising it)."""
    from pyspark.sql import functions as F

    flagged = [F.sum(F.coalesce(F.array_contains("quality_flags", f), F.lit(False)).cast("long")).alias(f"flag_{f}")
               for f in FLAGS]
    return (
        df.groupBy("reason", "split", "label")
        .agg(F.count(F.lit(1)).alias("n"),
             F.sum(F.length("image")).alias("bytes"),
             *[F.sum(c).alias(c) for c in STAT_COLS],
             F.sum("npix").alias("npix"), *flagged)
        .collect()
    )


def counted_group(reason: str, n: int) -> "Row":
    """A :func:`group_counts` row for ``n`` files rejected with ``reason`` and known only by their count."""
    from pyspark.sql import Row

    fields = {"reason": reason, "split": None, "label": None, "n": n, "bytes": None,
              **dict.fromkeys(STAT_COLS), "npix": None, **{f"flag_{f}": 0 for f in FLAGS}}
    return Row(**fields)


def flag_counts(groups: Sequence["Row"]) -> Dict[str, Dict[str, int]]:
    """``{split: {flag: images}}`` of the accepted rows, from :func:`group_counts` (splits with a flag only)."""
    out: Dict[str, Dict[str, int]] = {}
    for g in groups:
        if g["reason"] is None and any(g[f"flag_{f}"] for f in FLAGS):
            into = out.setdefault(g["split"], dict.fromkeys(FLAGS, 0))
            for f in FLAGS:
                into[f] += int(g[f"flag_{f}"] or 0)
    return dict(sorted(out.items()))


@dataclass
class RunCounts:
    """What this run's files became; ``rejected`` includes ``already_ingested``."""

    rejected: Dict[str, int] = field(default_factory=dict)
    splits: Dict[str, int] = field(default_factory=dict)
    classes: Dict[str, int] = field(default_factory=dict)
    image_bytes: int = 0
    sums: List[float] = field(default_factory=lambda: [0.0] * 3)  #: train pixel sums per channel
    sumsqs: List[float] = field(default_factory=lambda: [0.0] * 3)
    pixels: int = 0

    @property
    def accepted(self) -> int:
        return sum(self.splits.values())

    @property
    def accounted(self) -> int:
        return self.accepted + sum(self.rejected.values())


def run_counts(groups: Sequence["Row"]) -> RunCounts:
    """Fold :func:`group_counts` rows into :class:`RunCounts`."""
    c = RunCounts()
    for g in groups:
        if g["reason"] is not None:
            c.rejected[g["reason"]] = c.rejected.get(g["reason"], 0) + g["n"]
            continue
        c.splits[g["split"]] = c.splits.get(g["split"], 0) + g["n"]
        if g["label"] is not None:
            c.classes[g["label"]] = c.classes.get(g["label"], 0) + g["n"]
        c.image_bytes += int(g["bytes"] or 0)
        if g["split"] == "train":
            c.sums = [a + float(g[f"s{i}"] or 0) for i, a in enumerate(c.sums)]
            c.sumsqs = [a + float(g[f"q{i}"] or 0) for i, a in enumerate(c.sumsqs)]
            c.pixels += int(g["npix"] or 0)
    return c


def check_run_accounted(files_seen: int, run: RunCounts) -> None:
    """Raise :class:`InvariantError` unless every listed file of this run got exactly one row."""
    if run.accounted != files_seen:
        raise InvariantError(f"ingest lost files: {files_seen} listed but {run.accepted} accepted + "
                             f"{run.accounted - run.accepted} rejected = {run.accounted}; nothing was written")


def check_invariant(files_seen: int, accepted: int, rejected: Mapping[str, int]) -> None:
    """Raise :class:`InvariantError` unless ``files_seen == accepted + sum(rejected)``.

    >>> check_invariant(3, 2, {"corrupt": 1})
    """
    total = accepted + sum(rejected.values())
    if files_seen != total:
        raise InvariantError(
            f"files_seen ({files_seen}) != accepted ({accepted}) + rejected ({sum(rejected.values())}) = {total}: "
            "files were lost or double counted; nothing was committed"
        )


def class_mapping(prior: Optional[Mapping[str, int]], labels: Mapping[str, int], cfg: IngestConfig) -> Dict[str, int]:
    """Sorted labels -> index; on append existing indices are kept and new labels get the next ones.

    >>> class_mapping(None, {"dog": 3, "cat": 1}, IngestConfig())
    {'cat': 0, 'dog': 1}
    """
    if not prior:
        return {lab: i for i, lab in enumerate(sorted(labels))}
    new = sorted(set(labels) - set(prior))
    if new and not cfg.allow_new_classes:
        raise DataError(f"--mode append: new classes {new} are not in the existing output's classes "
                        f"{sorted(prior)}; pass --set ingest.allow_new_classes=true to add them")
    out = dict(prior)
    nxt = max(out.values(), default=-1) + 1
    for lab in new:
        out[lab] = nxt
        nxt += 1
    return dict(sorted(out.items(), key=lambda kv: kv[1]))


@dataclass(frozen=True)
class Totals:
    """The whole output's counts after this run (this run's plus, on append, the prior manifest's)."""

    files_seen: int
    splits: Dict[str, int]
    rejected: Dict[str, int]
    class_counts: Dict[str, int]
    classes: Dict[str, int]
    image_bytes: int
    stats: Dict[str, Any]
    already_ingested: int

    @property
    def accepted(self) -> int:
        return sum(self.splits.values())


def totals(prior: Optional["IngestManifest"], run: RunCounts, files_seen: int, cfg: IngestConfig,
           channels: int) -> Totals:
    """Add this run's counts to the prior manifest's (files already ingested are not counted twice)."""
    already = run.rejected.get(ALREADY_INGESTED, 0)
    return Totals(
        files_seen=(int(prior["files_seen"]) if prior else 0) + files_seen - already,
        splits=_add(dict(prior["splits"]) if prior else {}, run.splits),
        rejected=_add(dict(prior["rejected"]) if prior else {},
                      {k: v for k, v in run.rejected.items() if k != ALREADY_INGESTED}),
        class_counts=_add(dict(prior["class_counts"]) if prior else {}, run.classes),
        classes=class_mapping(prior.get("classes") if prior else None, run.classes, cfg),
        image_bytes=run.image_bytes + (int(prior.get("image_bytes", 0)) if prior else 0),
        stats=train_stats((prior or {}).get("stats"), run.sums[:channels], run.sumsqs[:channels], run.pixels),
        already_ingested=already,
    )


def _add(a: Mapping[str, int], b: Mapping[str, int]) -> Dict[str, int]:
    out = dict(a)
    for k, v in b.items():
        out[k] = out.get(k, 0) + v
    return {k: v for k, v in out.items() if v}


def train_stats(prior: Optional[Mapping[str, Any]], sums: List[float], sumsqs: List[float], n: int) -> Dict[str, Any]:
    """The train split's per-channel mean/std and pixel count, a prior manifest's stats included."""
    sums, sumsqs, n = _combine_stats(prior, sums, sumsqs, n)
    return {**channel_mean_std(sums, sumsqs, n), "pixels": n, "split": "train"}


def _combine_stats(prior: Optional[Mapping[str, Any]], sums: List[float], sqs: List[float],
                   n: int) -> Tuple[List[float], List[float], int]:
    """Add a prior manifest's train stats (mean/std/pixels) to new sums, for appends."""
    if not prior or not prior.get("pixels") or not prior.get("mean"):
        return sums, sqs, n
    pn = int(prior["pixels"])
    ps = [m * pn for m in prior["mean"]]
    pq = [(s * s + m * m) * pn for m, s in zip(prior["mean"], prior["std"])]
    return [a + b for a, b in zip(sums, ps)], [a + b for a, b in zip(sqs, pq)], n + pn
