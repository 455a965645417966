"""Data quality at ingest: near-duplicate groups applied to the splits, the manifest block, examples to look at.

:func:`apply` runs between the duplicate resolution and the accounting, so the counts (and
the invariant ``files_seen == accepted + rejected``) already include what it moved or rejected.
:func:`block` is the manifest's ``quality`` block (flag counts come with the accounting's
aggregation, :func:`pipeline.ingest.accounting.flag_counts`); :func:`examples` the few thumbnails of each
flag and of near-duplicate pairs that the run report shows (:data:`pipeline.contracts.QUALITY_EXAMPLES`).
"""
from __future__ import annotations

import base64
import io
import logging
from typing import TYPE_CHECKING, Any, Dict, Mapping, Optional, Sequence, Tuple

from pipeline.config import IngestConfig
from pipeline.imaging.quality import FLAGS

if TYPE_CHECKING:  # pragma: no cover
    from pyspark.sql import DataFrame

    from pipeline.ingest.near_dups import NearDuplicates

log = logging.getLogger(__name__)

THUMB_SIDE = 96


def apply(df: "DataFrame", cfg: IngestConfig, stored: Optional["DataFrame"], *,
          rows_at_most: Optional[int] = None, on_executors: bool = False) -> "NearDuplicates":
    """``ingest.near_duplicates`` applied to ``df``; ``off`` adds the columns without looking for pairs.

    ``rows_at_most`` bounds the rows of ``df`` plus ``stored`` (files listed plus images stored):
    at most :data:`pipeline.ingest.near_dups.DRIVER_HASHES_MAX`, the groups are found on the driver.
    ``on_executors`` (``ingest.listing: executors``): never a row per image or per hash on the
    driver; the pairs are found by a join on the executors whatever the size.
    """
    from pyspark.sql import functions as F

    from pipeline.ingest.near_dups import NearDuplicates, with_near_duplicates

    if cfg.near_duplicates == "off":
        return NearDuplicates(df.withColumn("near_dup_group", F.lit(None).cast("string"))
                              .withColumn("near_dup_size", F.lit(1)).withColumn("near_dup_oversized", F.lit(False)),
                              {"policy": "off"}, [])
    if stored is not None and "phash" not in stored.columns:
        log.warning("ingest: the output was written without perceptual hashes: near-duplicates are looked "
                    "for among the new files only (re-ingest with --mode overwrite to cover every image)")
        stored = None
    if on_executors:
        return with_near_duplicates(df, policy=cfg.near_duplicates, distance=cfg.near_dup_distance,
                                    max_group=cfg.near_dup_max_group, stored=stored, driver_max=0)
    return with_near_duplicates(df, policy=cfg.near_duplicates, distance=cfg.near_dup_distance,
                                max_group=cfg.near_dup_max_group, stored=stored, rows_at_most=rows_at_most)


def block(cfg: IngestConfig, flags: Mapping[str, Mapping[str, int]], near: Mapping[str, Any],
          prior: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """The manifest's ``quality`` block; on append the prior manifest's flag counts are added."""
    total: Dict[str, Dict[str, int]] = {}
    for counts in (((prior or {}).get("quality") or {}).get("flags") or {}, flags):
        for split, per in counts.items():
            into = total.setdefault(split, dict.fromkeys(FLAGS, 0))
            for f, n in per.items():
                into[f] = into.get(f, 0) + int(n)
    return {"thresholds": cfg.quality.model_dump(), "reject_flags": list(cfg.reject_flags),
            "flags": dict(sorted(total.items())), "near_duplicates": dict(near)}


def _thumb(data: bytes) -> str:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB") if im.mode not in ("RGB", "L") else im.copy()
    if max(im.size) < THUMB_SIDE:  # small images are enlarged (pixelated) so a person can see them
        scale = THUMB_SIDE // max(im.size)
        im = im.resize((im.width * scale, im.height * scale), Image.Resampling.NEAREST)
    im.thumbnail((THUMB_SIDE, THUMB_SIDE))
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def examples(df: "DataFrame", pairs: Sequence[Tuple[str, str]], *, per_flag: int = 4) -> Dict[str, Any]:
    """A few accepted images per flag, and the near-duplicate ``pairs`` (image ids, chosen by
    :func:`pipeline.ingest.near_dups.example_pairs`), as thumbnails.

    The choice of flagged images runs on the ids alone; only the chosen images' bytes reach the driver.
    """
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    acc = df.filter(F.col("reason").isNull())
    flagged = (acc.filter(F.size("quality_flags") > 0).select("image_id", F.explode("quality_flags").alias("flag"))
               .withColumn("_n", F.row_number().over(Window.partitionBy("flag").orderBy("image_id")))
               .filter(F.col("_n") <= per_flag).collect())
    wanted = {r["image_id"] for r in flagged} | {i for pair in pairs for i in pair}
    data = {r["image_id"]: r for r in acc.filter(F.col("image_id").isin(sorted(wanted)))
            .select("image_id", "source_path", "split", "image").collect()} if wanted else {}

    def shown(image_id: str) -> Dict[str, Any]:
        r = data[image_id]
        return {"source_path": r["source_path"], "split": r["split"], "png": _thumb(r["image"])}

    out: Dict[str, Any] = {"flags": {}, "near_duplicate_pairs": []}
    for r in sorted(flagged, key=lambda r: (FLAGS.index(r["flag"]), r["_n"])):
        out["flags"].setdefault(r["flag"], []).append(shown(r["image_id"]))
    for pair in pairs:
        out["near_duplicate_pairs"].append([shown(i) for i in pair])
    return out
