"""Near-duplicate groups at cluster scale: pairs of perceptual hashes within a Hamming distance.

No all-pairs comparison. Images with the same hash are one node; the distinct hashes are
split into ``m = d + 2`` blocks of about ``64 / m`` bits (``d`` = ``ingest.near_dup_distance``).
Two hashes within distance ``d`` differ in at most ``d`` blocks, so they agree exactly on
at least two of them (pigeonhole): every one of the ``C(m, 2)`` block pairs is a join key, a
self-join on equal keys yields every candidate pair, and ``bit_count(a ^ b) <= d`` keeps the
true ones. Recall is exact; the keys have ``128 / (d + 2)`` bits (21 at ``d = 4``), so
buckets stay small for random-looking hashes. That join is the work that grows with the
data, and it runs on executors as Spark SQL on ``LongType`` hashes (no Python worker).

The pairs' connected components are the groups: the pairs stream to the driver into a
union-find (:func:`roots_of`; memory grows with the images that have a near-duplicate, not
with all images), and the hash -> root map is broadcast back. A group is named by its
smallest ``image_id`` (its "earliest member"), whose split the others follow under
``ingest.near_duplicates: same_split``. A group larger than ``ingest.near_dup_max_group`` is
a sign of a distance too loose for the data (similar-looking images chain together): it is
marked oversized and reported, never acted on.
"""
from __future__ import annotations

import itertools
import logging
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Tuple

from pipeline.imaging.quality import HASH_BITS

if TYPE_CHECKING:  # pragma: no cover
    from pyspark.sql import Column, DataFrame

log = logging.getLogger(__name__)

def blocks(distance: int) -> List[Tuple[int, int]]:
    """(shift, width) of the ``distance + 2`` blocks covering the 64 bits."""
    m = distance + 2
    edges = [round(HASH_BITS * i / m) for i in range(m + 1)]
    return [(edges[i], edges[i + 1] - edges[i]) for i in range(m)]


def _block(h: "Column", shift: int, width: int) -> "Column":
    from pyspark.sql import functions as F

    return F.shiftrightunsigned(h, shift).bitwiseAND(F.lit((1 << width) - 1))


def candidate_keys(hashes: "DataFrame", *, distance: int, hash_col: str = "phash") -> "DataFrame":
    """One row per (hash, band) with the band's key; every pair within ``distance`` shares a key."""
    from pyspark.sql import functions as F

    h = F.col(hash_col)
    bl = blocks(distance)
    keys = [F.struct(F.lit(t).alias("band"), _block(h, *bl[i]).alias("k1"), _block(h, *bl[j]).alias("k2"))
            for t, (i, j) in enumerate(itertools.combinations(range(len(bl)), 2))]
    return hashes.select(h.alias("h"), F.explode(F.array(*keys)).alias("key")).select("h", "key.*")


def hash_pairs(hashes: "DataFrame", *, distance: int, hash_col: str = "phash") -> "DataFrame":
    """Distinct pairs ``(a, b, distance)`` with ``a < b`` of the distinct hashes within ``distance``."""
    from pyspark.sql import functions as F

    if distance <= 0:
        return hashes.sparkSession.createDataFrame([], "a long, b long, distance int")
    keys = candidate_keys(hashes.select(hash_col).distinct(), distance=distance, hash_col=hash_col)
    left, right = keys.alias("l"), keys.alias("r")
    return (
        left.join(right, on=[F.col("l.band") == F.col("r.band"), F.col("l.k1") == F.col("r.k1"),
                             F.col("l.k2") == F.col("r.k2"), F.col("l.h") < F.col("r.h")], how="inner")
        .select(F.col("l.h").alias("a"), F.col("r.h").alias("b"))
        .distinct()
        .withColumn("distance", F.bit_count(F.col("a").bitwiseXOR(F.col("b"))).cast("int"))
        .filter(F.col("distance") <= distance)
    )


def roots_of(pairs: Iterable[Tuple[int, int]]) -> Dict[int, int]:
    """Each hash of ``pairs`` -> the smallest hash of its connected component (union-find).

    Runs on the driver over the pairs streamed from the executors: its memory grows with
    the number of images that have a near-duplicate, never with the number of images.
    """
    parent: Dict[int, int] = {}

    def find(x: int) -> int:
        root = x
        while parent.get(root, root) != root:
            root = parent[root]
        while x != root:  # path compression
            parent[x], x = root, parent[x]
        return root

    for a, b in pairs:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    nodes = set(parent) | set(parent.values())
    return {x: find(x) for x in nodes}


def with_near_dup_groups(df: "DataFrame", *, distance: int, max_group: int, id_col: str = "image_id",
                         hash_col: str = "phash") -> "DataFrame":
    """``df`` plus ``near_dup_group`` (the group's smallest ``id_col``; null for an image without a
    near-duplicate), ``near_dup_size`` (1 then) and ``near_dup_oversized`` (the group has more than
    ``max_group`` members: a distance too loose for the data chains similar images together, and
    such a group is reported, never acted on). ``hash_col`` must not be null. Images with equal
    hashes are always one group.

    Everything the driver sees is per hash that has a near-duplicate or an equal twin; the
    images are touched by one aggregation, the pair join, and one broadcast join.
    """
    from pyspark.sql import functions as F

    per_hash = df.groupBy(hash_col).agg(F.count(F.lit(1)).alias("n"), F.min(id_col).alias("first")).cache()
    try:
        pairs = hash_pairs(per_hash, distance=distance, hash_col=hash_col).select("a", "b")
        roots = roots_of((r.a, r.b) for r in pairs.toLocalIterator())
        twins = {r[hash_col]: r[hash_col] for r in per_hash.filter(F.col("n") > 1).select(hash_col).toLocalIterator()}
        mapping = df.sparkSession.createDataFrame(list((twins | roots).items()), f"{hash_col} long, _root long")
        groups = (per_hash.join(F.broadcast(mapping), on=hash_col, how="inner")
                  .groupBy("_root").agg(F.sum("n").cast("int").alias("near_dup_size"),
                                        F.min("first").alias("near_dup_group")))
        member = F.broadcast(mapping.join(groups, on="_root", how="inner").drop("_root")).localCheckpoint()
    finally:
        per_hash.unpersist()
    return (
        df.join(member, on=hash_col, how="left")
        .withColumn("near_dup_size", F.coalesce(F.col("near_dup_size"), F.lit(1)))
        .withColumn("near_dup_oversized", F.col("near_dup_size") > F.lit(max_group))
    )


#: ``split_source`` of rows already in the output on append: never moved, never rejected.
STORED = "stored"


def with_near_duplicates(df: "DataFrame", *, policy: str, distance: int, max_group: int,
                         stored: "DataFrame | None" = None) -> Tuple["DataFrame", Dict[str, Any]]:
    """Apply ``ingest.near_duplicates`` to the accepted rows of ``df`` (:data:`pipeline.ingest.extract.PROCESSED_DDL`).

    Returns ``(frame, summary)``: ``frame`` has ``df``'s columns plus ``near_dup_group``,
    ``near_dup_size`` and ``near_dup_oversized`` (null / 1 / false outside a group), with ``split`` changed by ``same_split`` and ``reason`` /
    ``detail`` by ``keep_one``. ``stored`` (on append: the output's ``image_id, phash, split``)
    takes part in the groups but is never moved or rejected, so new files follow the stored ones.

    Every group has one *anchor*: its member with the smallest ``image_id`` among those whose
    split was given (a split folder, or already stored), else among all. ``same_split`` moves a
    member into the anchor's split when its own split came from the content hash (or, carved out
    of ``train/``, when the anchor is in train or val); ``keep_one`` keeps the anchor and rejects
    the rest. Oversized groups are left alone. Only the rows that have a near-duplicate are
    decided (a small frame); they are joined back by ``image_id``.
    """
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    from pipeline.imaging.reasons import NEAR_DUPLICATE

    cols = ["image_id", "phash", "split", "split_source", "source_path"]
    acc = df.filter(F.col("reason").isNull() & F.col("phash").isNotNull()).select(*cols)
    if stored is not None:
        acc = acc.unionByName(stored.filter(F.col("phash").isNotNull()).select(
            "image_id", "phash", "split", F.lit(STORED).alias("split_source"), "source_path"))
    grouped = with_near_dup_groups(acc, distance=distance, max_group=max_group).filter(
        F.col("near_dup_group").isNotNull())
    given = F.col("split_source").isin("folder", STORED)
    anchor = F.min(F.struct((~given).alias("o"), F.col("image_id").alias("i"), F.col("split").alias("s"),
                            F.col("source_path").alias("p"))).over(Window.partitionBy("near_dup_group"))
    d = grouped.withColumn("_a", anchor)
    acting = ~F.col("near_dup_oversized") & (F.col("split_source") != STORED)
    split = F.col("split")
    if policy == "same_split":
        movable = (F.col("split_source") == "hash") | (
            (F.col("split_source") == "carved") & F.col("_a.s").isin("train", "val"))
        split = F.when(acting & movable, F.col("_a.s")).otherwise(F.col("split"))
    reject = acting & (F.col("image_id") != F.col("_a.i")) if policy == "keep_one" else F.lit(False)
    everyone = d.select(
        "image_id", "split_source", split.alias("_split"), F.col("split").alias("_split_before"),
        F.when(reject, F.lit(NEAR_DUPLICATE)).alias("_reason"),
        F.when(reject, F.concat(F.lit(f"near-duplicate (pHash within Hamming distance {distance}) of "),
                                F.col("_a.p"))).alias("_detail"),
        "near_dup_group", "near_dup_size", "near_dup_oversized",
    ).localCheckpoint()
    summary = summarize(everyone) | {"policy": policy, "distance": distance, "max_group": max_group}
    decided = everyone.filter(F.col("split_source") != STORED).drop("split_source")
    n = summary["images_in_groups"]
    log.info("ingest: %d images in %d near-duplicate groups (distance %d), %d cross-split groups", n,
             summary["groups"], distance, sum(summary["cross_split_groups"].values()))
    small = F.broadcast(decided) if n <= 2_000_000 else decided
    hit = F.col("reason").isNull() & F.col("_split").isNotNull()
    return (
        df.join(small, on="image_id", how="left")
        .select(
            *[c for c in df.columns if c not in ("split", "reason", "detail")],
            F.when(hit, F.col("_split")).otherwise(F.col("split")).alias("split"),
            F.when(hit & F.col("_reason").isNotNull(), F.col("_reason")).otherwise(F.col("reason")).alias("reason"),
            F.when(hit & F.col("_reason").isNotNull(), F.col("_detail")).otherwise(F.col("detail")).alias("detail"),
            F.when(hit, F.col("near_dup_group")).alias("near_dup_group"),
            F.when(hit, F.col("near_dup_size")).otherwise(F.lit(1)).alias("near_dup_size"),
            F.when(hit, F.col("near_dup_oversized")).otherwise(F.lit(False)).alias("near_dup_oversized"),
        )
        .select(*df.columns, "near_dup_group", "near_dup_size", "near_dup_oversized")
    ), summary


def summarize(members: "DataFrame") -> Dict[str, Any]:
    """Counts of near-duplicate groups from one row per member (``near_dup_group``, ``near_dup_size``,
    ``near_dup_oversized``, ``_split`` after the policy, ``_split_before``, ``_reason``).

    A group whose kept members are in more than one split is *cross-split*: listed by its splits
    (``"test+train"``), and each of its kept members in split ``s`` counts as a leaked image of
    ``s``. Oversized groups are counted apart (they were left alone).
    """
    from pyspark.sql import functions as F

    kept = members.filter(F.col("_reason").isNull())
    per_group = kept.groupBy("near_dup_group").agg(
        F.array_sort(F.collect_set("_split")).alias("splits"), F.first("near_dup_oversized").alias("over"))
    shapes = per_group.groupBy("splits", "over").agg(F.count(F.lit(1)).alias("groups")).collect()
    leaked = (kept.join(per_group.filter((F.size("splits") > 1) & ~F.col("over")), "near_dup_group")
              .groupBy("_split").count().collect())
    totals = members.agg(
        F.count(F.lit(1)).alias("images"), F.countDistinct("near_dup_group").alias("groups"),
        F.coalesce(F.max("near_dup_size"), F.lit(0)).alias("largest"),
        F.sum(F.when(F.col("_split") != F.col("_split_before"), 1).otherwise(0)).alias("moved"),
        F.sum(F.when(F.col("_reason").isNotNull(), 1).otherwise(0)).alias("rejected"),
    ).first()
    over = members.filter(F.col("near_dup_oversized")).agg(F.countDistinct("near_dup_group")).first()[0]
    cross: Dict[str, int] = {}
    cross_over: Dict[str, int] = {}
    for r in shapes:
        if len(r["splits"]) > 1:
            into = cross_over if r["over"] else cross
            into["+".join(r["splits"])] = into.get("+".join(r["splits"]), 0) + int(r["groups"])
    return {
        "images_in_groups": int(totals["images"]), "groups": int(totals["groups"]),
        "largest_group": int(totals["largest"]), "oversized_groups": int(over or 0),
        "moved": int(totals["moved"] or 0), "rejected": int(totals["rejected"] or 0),
        "cross_split_groups": dict(sorted(cross.items())),
        "leaked_images": {r["_split"]: int(r["count"]) for r in sorted(leaked, key=lambda r: r["_split"])},
        "oversized_cross_split_groups": dict(sorted(cross_over.items())),
    }
