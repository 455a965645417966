"""Near-duplicate groups at cluster scale: pairs of perceptual hashes within a Hamming distance.

No all-pairs comparison. Images with the same hash are one node; the distinct hashes are
split into ``m = d + 2`` blocks of about ``64 / m`` bits (``d`` = ``ingest.near_dup_distance``).
Two hashes within distance ``d`` differ in at most ``d`` blocks, so they agree exactly on
at least two of them (pigeonhole): every one of the ``C(m, 2)`` block pairs is a join key, a
self-join on equal keys yields every candidate pair, and ``bit_count(a ^ b) <= d`` keeps the
true ones. Recall is exact; the keys have ``128 / (d + 2)`` bits (21 at ``d = 4``), so
buckets stay small for random-looking hashes. The pairs' connected components, found by
iterated min-label propagation on executors, are the groups; a group is named by its
smallest ``image_id`` (its "earliest member"), whose split the others follow under
``ingest.near_duplicates: same_split``.

All of it is Spark SQL on ``LongType`` hashes: no Python worker is involved.
"""
from __future__ import annotations

import itertools
import logging
from typing import TYPE_CHECKING, List, Tuple

from pipeline.imaging.quality import HASH_BITS

if TYPE_CHECKING:  # pragma: no cover
    from pyspark.sql import Column, DataFrame

log = logging.getLogger(__name__)

#: How many label-propagation rounds a component may need before the job gives up (its diameter).
MAX_ROUNDS = 64


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


def components(nodes: "DataFrame", edges: "DataFrame") -> "DataFrame":
    """``(node, root)``: each node's smallest connected node, by min-label propagation.

    ``nodes`` has a column ``node``; ``edges`` has ``a``, ``b`` (undirected). Each round every
    node takes the smallest root among itself and its neighbours; it stops when a round changes
    nothing (rounds = the largest component's diameter, small for near-duplicate groups).
    """
    from pyspark.sql import functions as F

    both = edges.select("a", "b").unionByName(edges.select(F.col("b").alias("a"), F.col("a").alias("b"))).cache()
    labels = nodes.select("node", F.col("node").alias("root")).localCheckpoint()
    try:
        for _ in range(MAX_ROUNDS):
            offered = both.join(labels, on=both["a"] == labels["node"], how="inner").select(
                F.col("b").alias("node"), F.col("root"))
            nxt = (labels.unionByName(offered).groupBy("node").agg(F.min("root").alias("root"))).localCheckpoint()
            changed = (nxt.alias("n").join(labels.alias("o"), on="node", how="inner")
                       .filter(F.col("n.root") != F.col("o.root")).limit(1).count())
            labels = nxt
            if not changed:
                return labels
        raise RuntimeError(f"near-duplicate groups did not settle in {MAX_ROUNDS} rounds")
    finally:
        both.unpersist()


def with_near_dup_groups(df: "DataFrame", *, distance: int, id_col: str = "image_id",
                         hash_col: str = "phash") -> "DataFrame":
    """``df`` plus ``near_dup_group`` (the group's smallest ``id_col``; null for an image without
    a near-duplicate) and ``near_dup_size``. Images with equal hashes are always one group."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    nodes = df.select(F.col(hash_col).alias("node")).distinct()
    roots = components(nodes, hash_pairs(df, distance=distance, hash_col=hash_col))
    w = Window.partitionBy("_root")
    return (
        df.join(roots.select(F.col("node").alias(hash_col), F.col("root").alias("_root")), on=hash_col, how="left")
        .withColumn("near_dup_size", F.count(F.lit(1)).over(w).cast("int"))
        .withColumn("near_dup_group", F.when(F.col("near_dup_size") > 1, F.min(id_col).over(w)))
        .drop("_root")
    )
