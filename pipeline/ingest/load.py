"""Load: write images/ and rejects/ into the staging folder, reconcile them with the counts, write the manifest.

* :func:`plan_files` - write tasks and rows per file, so the train split gets enough row groups;
* :func:`write_images` / :func:`write_rejects` - the Parquet writes (rows shuffled within a split
  by a seeded hash of ``image_id``: the same order every run);
* :func:`reconcile` - the staged files' footers (``FileSystem.parquet_counts``, a few threads)
  against the counts; a mismatch fails before anything is committed;
* :func:`build_manifest` + :func:`pipeline.contracts.write_manifest` - ``_manifest.json``.
"""
from __future__ import annotations

import logging
import math
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Tuple
from urllib.parse import unquote

from pipeline.config import IngestConfig
from pipeline.contracts import IMAGES_DIR, MANIFEST_VERSION, REJECTS_DIR
from pipeline.errors import InvariantError
from pipeline.fs import FileSystem, join, name_of
from pipeline.ingest.accounting import RunCounts, Totals, check_invariant
from pipeline.schema import SPLIT_COLUMN

if TYPE_CHECKING:  # pragma: no cover
    from pyspark.sql import DataFrame

    from pipeline.contracts import IngestManifest

log = logging.getLogger(__name__)


def plan_files(n_train: int, total_rows: int, total_bytes: int, cfg: IngestConfig, slots: int) -> Tuple[int, int]:
    """(write tasks, max rows per file) so train gets >= 4 x max_train_procs row groups, files ~target size."""
    need = 4 * cfg.max_train_procs
    avg = max(1.0, total_bytes / max(1, total_rows))
    rows_per_target = max(1, int(cfg.target_file_mb * 1024 * 1024 / avg))
    rows_per_file = rows_per_target
    if n_train > 0:
        # One file holds one row group (files stay below parquet.block.size), so the train split
        # is cut into at least `need` files: tiny data gets small files rather than too few shards.
        rows_per_file = max(1, min(rows_per_target, n_train // need))
    tasks = max(slots, math.ceil(total_bytes / (cfg.target_file_mb * 1024 * 1024)))
    return tasks, rows_per_file


def write_images(images: "DataFrame", staging: str, cfg: IngestConfig, *, tasks: Optional[int],
                 rows_per_file: int) -> None:
    """``<staging>/images/split=<s>/``; ``tasks`` None keeps the partitioning (already hashed by image_id)."""
    from pyspark.sql import functions as F

    rank = F.xxhash64(F.lit(cfg.seed), F.col("image_id"))
    if tasks is not None:
        images = images.repartition(tasks, rank)
    (
        images.withColumn("_rk", rank)
        .sortWithinPartitions(SPLIT_COLUMN, "_rk")  # shuffled within a split, same order every run
        .drop("_rk")
        .write.partitionBy(SPLIT_COLUMN)
        .option("maxRecordsPerFile", rows_per_file)
        .option("parquet.block.size", str(max(128, 2 * cfg.target_file_mb) * 1024 * 1024))
        .parquet(join(staging, IMAGES_DIR))
    )


def write_rejects(rejects: "DataFrame", staging: str, n_rejected: int) -> None:
    """``<staging>/rejects/``, sorted by source path, about a million rows per file."""
    (
        rejects.repartition(max(1, math.ceil(n_rejected / 1_000_000)))
        .sortWithinPartitions("source_path")
        .write.parquet(join(staging, REJECTS_DIR))
    )


def reconcile(fs: FileSystem, staging: str, files_seen: int, splits: Mapping[str, int]) -> Dict[str, int]:
    """Check the staged footers against the counts; returns row groups per split.

    Raises :class:`InvariantError` (nothing is committed) when ``files_seen`` is not the written
    images plus the written rejects, or a split holds another number of rows than counted.
    """
    split_dirs = {s: join(staging, IMAGES_DIR, f"{SPLIT_COLUMN}={s}") for s in _split_values(fs, join(staging, IMAGES_DIR))}
    counted = footer_counts(fs, [*split_dirs.values(), join(staging, REJECTS_DIR)])
    footers = {s: counted[d] for s, d in split_dirs.items()}
    written = {s: n for s, (_, n) in footers.items() if n}
    check_invariant(files_seen, sum(written.values()), {"(written rejects)": counted[join(staging, REJECTS_DIR)][1]})
    if written != splits:
        raise InvariantError(f"images/ holds {written} rows per split, expected {splits}: nothing was committed")
    return {s: footers[s][0] for s in sorted(splits)}


def footer_counts(fs: FileSystem, folders: List[str]) -> Dict[str, Tuple[int, int]]:
    """Folder -> (row groups, rows) of its Parquet files, from their footers only.

    One small read per file (files are few and large) and no Spark job. The reads go through a
    few threads: one at a time, 46 footers took 0.5-0.9 s, mostly round trips.
    """
    files = [(d, f) for d in folders for f in fs.list(d) if f.endswith(".parquet")]
    out = {d: (0, 0) for d in folders}
    with ThreadPoolExecutor(max_workers=min(8, max(1, len(files)))) as pool:
        for (d, _), (groups, rows) in zip(files, pool.map(fs.parquet_counts, [f for _, f in files])):
            out[d] = (out[d][0] + groups, out[d][1] + rows)
    return out


def _split_values(fs: FileSystem, images_dir: str) -> List[str]:
    """The split values of the ``split=<value>`` folders under ``images_dir``.

    Hive-style partition escaping (``%2F`` -> ``/``) is undone, as Spark does when reading.
    """
    prefix = f"{SPLIT_COLUMN}="
    names = [name_of(f) for f in fs.list(images_dir)]
    return sorted(unquote(n[len(prefix):]) for n in names if n.startswith(prefix))


def warn_if_few_row_groups(row_groups: Mapping[str, int], n_train: int, cfg: IngestConfig) -> None:
    need = 4 * cfg.max_train_procs
    if 0 < n_train and row_groups.get("train", 0) < need:
        log.warning("ingest: train split has %d row groups (%d rows) < 4 x ingest.max_train_procs = %d: "
                    "training with that many processes will not get a shard each",
                    row_groups.get("train", 0), n_train, need)


def image_block(cfg: IngestConfig) -> Dict[str, Any]:
    """The manifest's ``image`` entry: what every stored image is."""
    return {"height": cfg.height, "width": cfg.width, "channels": 3 if cfg.color_mode == "RGB" else 1,
            "color_mode": cfg.color_mode, "format": cfg.encode_format}


def build_manifest(*, cfg: IngestConfig, prior: Optional["IngestManifest"], input_uri: str, output_uri: str,
                   mode: str, carved: bool, total: Totals, run: RunCounts, files_seen: int,
                   files_read: Optional[int], listed_at: str, row_groups: Mapping[str, int],
                   timings: Mapping[str, float]) -> Dict[str, Any]:
    """``_manifest.json``'s fields (docs/contracts.md); ``files_seen`` is this run's listing,
    ``files_read`` the files whose bytes it read (None: all), ``listed_at`` when it started."""
    manifest = {
        "version": MANIFEST_VERSION,
        "input_uri": input_uri,
        "output_uri": output_uri,
        "files_seen": total.files_seen,
        "accepted": total.accepted,
        "rejected": dict(sorted(total.rejected.items())),
        "splits": dict(sorted(total.splits.items())),
        "class_counts": dict(sorted(total.class_counts.items())),
        "classes": total.classes,
        "image": image_block(cfg),
        "val_carved_from_train": carved,
        "image_bytes": total.image_bytes,
        "stats": total.stats,
        "row_groups": dict(row_groups),
        "config": cfg.model_dump(mode="json"),
        "mode": mode,
        "run": {
            "files_seen": files_seen, "accepted": run.accepted,
            "rejected": dict(sorted(run.rejected.items())), "already_ingested": total.already_ingested,
            "files_read": files_seen if files_read is None else files_read,
        },
        # per input URI: when its latest ingest started listing (an append's cutoff, pipeline.ingest.unchanged)
        "listed_at": {**(dict(prior.listed_at) if prior else {}), input_uri: listed_at},
        "appends": (int(prior.get("appends", 0)) + 1) if prior else 0,
        "timings": dict(timings),
        "images_per_second": round(files_seen / max(timings["total_s"], 1e-9), 2),
    }
    if prior is not None:
        manifest["input_uris"] = sorted(set(prior.get("input_uris", [prior["input_uri"]]) + [input_uri]))
    return manifest
