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
from typing import TYPE_CHECKING, Dict, Iterable, List, Tuple

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
