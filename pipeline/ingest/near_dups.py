"""Near-duplicate groups at cluster scale: pairs of perceptual hashes within a Hamming distance.

No all-pairs comparison. Images with the same hash are one node; the distinct hashes are
split into ``m = d + 2`` blocks of about ``64 / m`` bits (``d`` = ``ingest.near_dup_distance``).
Two hashes within distance ``d`` differ in at most ``d`` blocks, so they agree exactly on
at least two of them (pigeonhole): every one of the ``C(m, 2)`` block pairs is a join key, a
self-join on equal keys yields every candidate pair, and ``bit_count(a ^ b) <= d`` keeps the
true ones. Recall is exact; the keys have ``128 / (d + 2)`` bits (21 at ``d = 4``), so
buckets stay small for random-looking hashes. Up to :data:`DRIVER_HASHES_MAX` rows, the
matching runs in numpy on the driver over one collected row per hash or image
(:func:`local_pairs`); above, it is a Spark SQL self-join on the executors, on ``LongType``
hashes (no Python worker), and only the pairs reach the driver.

The pairs' connected components are the groups, found by a union-find on the driver
(:func:`roots_of`; past the driver bound, memory grows with the images that have a
near-duplicate, not with all images). The policy (:func:`decide`) runs on the driver over one
row per image in a group, and its decisions are broadcast back. A group is named by its
smallest ``image_id`` (its "earliest member"), whose split the others follow under
``ingest.near_duplicates: same_split``. A group larger than ``ingest.near_dup_max_group`` is
a sign of a distance too loose for the data (similar-looking images chain together): it is
marked oversized and reported, never acted on.
"""
from __future__ import annotations

import itertools
import logging
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Mapping, NamedTuple, Optional, Sequence, Tuple

from pipeline.imaging.quality import HASH_BITS

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    from pyspark.sql import Column, DataFrame

log = logging.getLogger(__name__)


class NearDuplicates(NamedTuple):
    """What :func:`with_near_duplicates` returns."""

    frame: "DataFrame"  #: the rows with the policy applied and the group columns
    summary: Dict[str, Any]  #: the manifest's ``quality.near_duplicates`` block
    pairs: List[Tuple[str, str]]  #: image ids of near-duplicate pairs to show, cross-split groups first

def blocks(distance: int) -> List[Tuple[int, int]]:
    """(shift, width) of the ``distance + 2`` blocks covering the 64 bits."""
    m = distance + 2
    edges = [round(HASH_BITS * i / m) for i in range(m + 1)]
    return [(edges[i], edges[i + 1] - edges[i]) for i in range(m)]


def _block(h: "Column", shift: int, width: int) -> "Column":
    from pyspark.sql import functions as F

    return F.shiftrightunsigned(h, shift).bitwiseAND(F.lit((1 << width) - 1))


def candidate_keys(hashes: "DataFrame", *, distance: int, hash_col: str = "phash",
                   carry: Sequence[str] = ()) -> "DataFrame":
    """One row per (hash, band) with the band's key (and the ``carry`` columns); every pair within
    ``distance`` shares a key."""
    from pyspark.sql import functions as F

    h = F.col(hash_col)
    bl = blocks(distance)
    keys = [F.struct(F.lit(t).alias("band"), _block(h, *bl[i]).alias("k1"), _block(h, *bl[j]).alias("k2"))
            for t, (i, j) in enumerate(itertools.combinations(range(len(bl)), 2))]
    return hashes.select(h.alias("h"), *carry, F.explode(F.array(*keys)).alias("key")).select("h", *carry, "key.*")


def hash_pairs(hashes: "DataFrame", *, distance: int, hash_col: str = "phash",
               carry: Sequence[str] = ()) -> "DataFrame":
    """Distinct pairs ``(a, b, distance)`` with ``a < b`` of the distinct hashes within ``distance``.

    ``carry`` names columns of ``hashes`` (one row per hash) brought along for both ends, as
    ``a_<col>`` and ``b_<col>``, so a caller needs no second join to learn about them.
    """
    from pyspark.sql import functions as F

    out = ["a", "b", "distance", *[f"{e}_{c}" for e in "ab" for c in carry]]
    if distance <= 0:  # equal hashes are not pairs (they are one node)
        return hashes.select(F.col(hash_col).alias("a"), F.col(hash_col).alias("b"), F.lit(0).alias("distance"),
                             *[F.col(c).alias(f"{e}_{c}") for e in "ab" for c in carry]).filter(F.lit(False))
    keys = candidate_keys(hashes.select(hash_col, *carry).distinct(), distance=distance, hash_col=hash_col,
                          carry=carry)
    left, right = keys.alias("l"), keys.alias("r")
    x = F.col("l.h").bitwiseXOR(F.col("r.h"))
    return (
        left.join(right, on=[F.col("l.band") == F.col("r.band"), F.col("l.k1") == F.col("r.k1"),
                             F.col("l.k2") == F.col("r.k2"), F.col("l.h") < F.col("r.h"),
                             F.bit_count(x) <= F.lit(distance)], how="inner")
        .select(F.col("l.h").alias("a"), F.col("r.h").alias("b"),
                *[F.col(f"{s}.{c}").alias(f"{e}_{c}") for e, s in (("a", "l"), ("b", "r")) for c in carry])
        .distinct()  # a pair agreeing on several bands meets itself on each
        .withColumn("distance", F.bit_count(F.col("a").bitwiseXOR(F.col("b"))).cast("int"))
        .select(*out)
    )


def roots_of(pairs: Iterable[Tuple[int, int]]) -> Dict[int, int]:
    """Each hash of ``pairs`` -> the smallest hash of its connected component (union-find).

    Runs on the driver over the pairs collected from the executors: its memory grows with
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


#: Up to this many distinct hashes, the pairs are found on the driver (:func:`local_pairs`, the
#: same blocks in numpy; at most ~100 MB there) instead of by the Spark self-join: one small
#: collect instead of a shuffle of ``C(d + 2, 2)`` keys per hash.
DRIVER_HASHES_MAX = 1_000_000

def _popcount(x: "np.ndarray") -> "np.ndarray":
    """Set bits of each uint64 in ``x`` (SWAR: numpy 1.26 has no ``bitwise_count``)."""
    import numpy as np

    x = np.asarray(x, dtype=np.uint64)
    x = x - ((x >> np.uint64(1)) & np.uint64(0x5555555555555555))
    x = (x & np.uint64(0x3333333333333333)) + ((x >> np.uint64(2)) & np.uint64(0x3333333333333333))
    x = (x + (x >> np.uint64(4))) & np.uint64(0x0F0F0F0F0F0F0F0F)
    return (x * np.uint64(0x0101010101010101)) >> np.uint64(56)


def local_pairs(hashes: "np.ndarray", *, distance: int) -> Tuple["np.ndarray", "np.ndarray"]:
    """Index pairs ``(i, j)``, ``i < j``, into the sorted distinct int64 ``hashes`` within ``distance``.

    The same block keys as :func:`hash_pairs` (exact recall), in numpy on one machine: per
    band, the hashes sorted by key, every pair inside a run of equal keys, verified with a
    popcount; pairs met on several bands are kept once.
    """
    import numpy as np

    u = np.ascontiguousarray(hashes, dtype=np.int64).view(np.uint64)
    if distance <= 0 or len(u) < 2:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    bl = blocks(distance)
    found = []
    for i, j in itertools.combinations(range(len(bl)), 2):
        (si, wi), (sj, wj) = bl[i], bl[j]
        key = (((u >> np.uint64(si)) & np.uint64((1 << wi) - 1)) << np.uint64(wj)) | (
            (u >> np.uint64(sj)) & np.uint64((1 << wj) - 1))
        order = np.argsort(key, kind="stable")
        k = key[order]
        starts = np.flatnonzero(np.r_[True, k[1:] != k[:-1]])
        sizes = np.diff(np.r_[starts, len(k)])
        # position p in a run of n (local index r) pairs with the n - r - 1 positions after it
        run_of = np.repeat(np.arange(len(starts)), sizes)
        later = (starts + sizes)[run_of] - np.arange(len(k)) - 1
        total = int(later.sum())
        if total == 0:
            continue
        left = np.repeat(np.arange(len(k)), later)
        ends = np.cumsum(later)
        step = np.arange(total) - np.repeat(ends - later, later)
        right = left + 1 + step
        a, b = order[left], order[right]
        keep = _popcount(u[a] ^ u[b]) <= distance
        lo, hi = np.minimum(a[keep], b[keep]), np.maximum(a[keep], b[keep])
        found.append(lo.astype(np.int64) * len(u) + hi)
    if not found:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    code = np.unique(np.concatenate(found))
    return code // len(u), code % len(u)


def group_members(df: "DataFrame", *, distance: int, id_col: str = "image_id", hash_col: str = "phash",
                  driver_max: int = DRIVER_HASHES_MAX) -> List[Tuple[int, str, int]]:
    """``(hash, group, size)`` for every hash of ``df`` that has a near-duplicate or an equal twin.

    ``group`` is the smallest ``id_col`` of the hash's connected component and ``size`` its
    number of images. Up to ``driver_max`` distinct hashes, the per-hash counts (images,
    smallest id) are collected and paired on the driver (:func:`local_pairs`); above it, one
    Spark job runs the self-join (:func:`hash_pairs`), the counts travelling with the pairs
    and with the hashes shared by several images. Either way the union-find and the per-group
    sums run on the driver over the pairs.
    """
    from pyspark.sql import functions as F

    per_hash = df.groupBy(hash_col).agg(F.count(F.lit(1)).alias("n"), F.min(id_col).alias("first"))
    per_hash = per_hash.cache()
    try:
        if per_hash.count() <= driver_max:
            return _members_on_driver(per_hash.toArrow(), distance=distance, hash_col=hash_col)
        pairs = hash_pairs(per_hash, distance=distance, hash_col=hash_col, carry=("n", "first")).drop("distance")
        twins = per_hash.filter(F.col("n") > 1).select(
            F.col(hash_col).alias("a"), F.col(hash_col).alias("b"), F.col("n").alias("a_n"),
            F.col("first").alias("a_first"), F.col("n").alias("b_n"), F.col("first").alias("b_first"))
        rows = pairs.unionByName(twins).toArrow()
    finally:
        per_hash.unpersist()
    a, b = rows.column("a").to_pylist(), rows.column("b").to_pylist()
    info: Dict[int, Tuple[int, str]] = {}
    for e, col in (("a", a), ("b", b)):
        info.update(zip(col, zip(rows.column(f"{e}_n").to_pylist(), rows.column(f"{e}_first").to_pylist())))
    return _components(info, zip(a, b))


def _members_on_driver(table: Any, *, distance: int, hash_col: str) -> List[Tuple[int, str, int]]:
    """:func:`group_members` from the collected per-hash table (``hash_col, n, first``)."""
    import numpy as np

    table = table.sort_by(hash_col)
    h = table.column(hash_col).to_numpy()
    n = table.column("n").to_numpy()
    first = table.column("first").to_pylist()
    i, j = local_pairs(h, distance=distance)
    nodes = np.unique(np.concatenate([i, j, np.flatnonzero(n > 1)]))
    info = {int(h[k]): (int(n[k]), first[k]) for k in nodes}
    return _components(info, zip(h[i].tolist(), h[j].tolist()))


def _components(info: Dict[int, Tuple[int, str]], pairs: Iterable[Tuple[int, int]]) -> List[Tuple[int, str, int]]:
    """``(hash, group, size)`` per hash of ``info`` (hash -> (images, smallest id)) over the ``pairs``."""
    roots = roots_of((x, y) for x, y in pairs if x != y)
    size: Dict[int, int] = {}
    first: Dict[int, str] = {}
    for h, (n, f) in info.items():
        root = roots.get(h, h)
        size[root] = size.get(root, 0) + int(n)
        first[root] = min(first.get(root, f), f)
    return [(h, first[roots.get(h, h)], size[roots.get(h, h)]) for h in info]


def with_near_dup_groups(df: "DataFrame", *, distance: int, max_group: int, id_col: str = "image_id",
                         hash_col: str = "phash", driver_max: int = DRIVER_HASHES_MAX) -> "DataFrame":
    """``df`` plus ``near_dup_group`` (the group's smallest ``id_col``; null for an image without a
    near-duplicate), ``near_dup_size`` (1 then) and ``near_dup_oversized`` (the group has more than
    ``max_group`` members: a distance too loose for the data chains similar images together, and
    such a group is reported, never acted on). ``hash_col`` must not be null. Images with equal
    hashes are always one group.

    Everything the driver sees is per hash that has a near-duplicate or an equal twin
    (:func:`group_members`); the images are touched by one aggregation, the pair join, and one
    broadcast join.
    """
    from pyspark.sql import functions as F

    import pyarrow as pa

    members = group_members(df, distance=distance, id_col=id_col, hash_col=hash_col, driver_max=driver_max)
    h, g, n = zip(*members) if members else ((), (), ())
    member = df.sparkSession.createDataFrame(pa.table({
        hash_col: pa.array(h, pa.int64()), "near_dup_group": pa.array(g, pa.string()),
        "near_dup_size": pa.array(n, pa.int32())}))
    small = F.broadcast(member) if len(members) <= 2_000_000 else member
    return (
        df.join(small, on=hash_col, how="left")
        .withColumn("near_dup_size", F.coalesce(F.col("near_dup_size"), F.lit(1)))
        .withColumn("near_dup_oversized", F.col("near_dup_size") > F.lit(max_group))
    )


#: ``split_source`` of rows already in the output on append: never moved, never rejected.
STORED = "stored"


def with_near_duplicates(df: "DataFrame", *, policy: str, distance: int, max_group: int,
                         stored: "DataFrame | None" = None, pairs: int = 6, rows_at_most: Optional[int] = None,
                         driver_max: int = DRIVER_HASHES_MAX) -> NearDuplicates:
    """Apply ``ingest.near_duplicates`` to the accepted rows of ``df`` (:data:`pipeline.ingest.extract.PROCESSED_DDL`).

    Returns a :class:`NearDuplicates`: ``frame`` has ``df``'s columns plus ``near_dup_group``,
    ``near_dup_size`` and ``near_dup_oversized`` (null / 1 / false outside a group), with ``split``
    changed by ``same_split`` and ``reason`` / ``detail`` by ``keep_one``; ``summary`` is the
    manifest's counts (:func:`summarize`); ``pairs`` up to ``pairs`` pairs of image ids to show
    (:func:`example_pairs`). ``stored`` (on append: the output's ``image_id, phash, split``)
    takes part in the groups but is never moved or rejected, so new files follow the stored ones.

    When ``rows_at_most`` (a bound on the rows of ``df`` plus ``stored`` known without a Spark
    job, e.g. the files listed) is at most ``driver_max``, one Spark job collects a narrow row
    per image (id, hash, split, where the split came from, path) and the groups are found on the
    driver (:func:`local_pairs`); otherwise :func:`with_near_dup_groups` finds them on the
    executors and one job collects the rows of the images in a group. Either way the policy
    (:func:`decide`) runs on the driver over those rows, and its decisions are broadcast back,
    joined by ``image_id``.
    """
    import pyarrow as pa
    from pyspark.sql import functions as F

    cols = ["image_id", "phash", "split", "split_source", "source_path"]
    acc = df.filter(F.col("reason").isNull() & F.col("phash").isNotNull()).select(*cols)
    if stored is not None:
        acc = acc.unionByName(stored.filter(F.col("phash").isNotNull()).select(
            "image_id", "phash", "split", F.lit(STORED).alias("split_source"), "source_path"))
    if rows_at_most is not None and rows_at_most <= driver_max:
        members = _grouped_on_driver(acc.toArrow(), distance=distance, max_group=max_group)
    else:
        grouped = with_near_dup_groups(acc, distance=distance, max_group=max_group, driver_max=driver_max)
        members = (grouped.filter(F.col("near_dup_group").isNotNull())
                   .select(*cols, "near_dup_group", "near_dup_size", "near_dup_oversized").toArrow().to_pylist())
    decided_rows = decide(members, policy=policy, distance=distance)
    summary = summarize(decided_rows) | {"policy": policy, "distance": distance, "max_group": max_group}
    log.info("ingest: %d images in %d near-duplicate groups (distance %d), %d cross-split groups",
             summary["images_in_groups"], summary["groups"], distance, sum(summary["cross_split_groups"].values()))
    new = [r for r in decided_rows if r["split_source"] != STORED]
    decided = df.sparkSession.createDataFrame(pa.Table.from_pylist(new, schema=_decided_schema()))
    small = F.broadcast(decided) if len(new) <= 2_000_000 else decided
    hit = F.col("reason").isNull() & F.col("_split").isNotNull()
    frame = (
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
    )
    return NearDuplicates(frame, summary, example_pairs(new, limit=pairs))


def _grouped_on_driver(table: Any, *, distance: int, max_group: int) -> List[Dict[str, Any]]:
    """The rows of ``table`` (``image_id, phash, ...``) whose image is in a group, with its group columns."""
    import pyarrow as pa
    import pyarrow.compute as pc

    agg = table.group_by("phash").aggregate([("image_id", "count"), ("image_id", "min")])
    per_hash = pa.table({"phash": agg["phash"], "n": agg["image_id_count"], "first": agg["image_id_min"]})
    found = _members_on_driver(per_hash, distance=distance, hash_col="phash")
    if not found:
        return []
    where = {h: (g, n) for h, g, n in found}
    rows = table.filter(pc.is_in(table["phash"], value_set=pa.array(list(where), pa.int64()))).to_pylist()
    for r in rows:
        g, n = where[r["phash"]]
        r.update(near_dup_group=g, near_dup_size=n, near_dup_oversized=n > max_group)
    return rows


def decide(members: Sequence[Mapping[str, Any]], *, policy: str, distance: int) -> List[Dict[str, Any]]:
    """The policy's decision for each image in a group (rows of ``image_id, split, split_source,
    source_path`` and the group columns): ``_split`` after it, ``_split_before``, and for
    ``keep_one`` ``_reason`` / ``_detail`` of the rejected members.

    A group's anchor is its member with the smallest ``image_id`` among those whose split was
    given (``split_source`` ``folder`` or stored), else among all. Oversized groups and stored
    rows are never acted on.
    """
    from pipeline.imaging.reasons import NEAR_DUPLICATE

    anchor: Dict[str, Tuple[Tuple[bool, str], Mapping[str, Any]]] = {}
    for r in members:
        key = (r["split_source"] not in ("folder", STORED), r["image_id"])
        g = r["near_dup_group"]
        if g not in anchor or key < anchor[g][0]:
            anchor[g] = (key, r)
    out = []
    for r in members:
        a = anchor[r["near_dup_group"]][1]
        acting = not r["near_dup_oversized"] and r["split_source"] != STORED
        split = r["split"]
        if policy == "same_split" and acting and (
                r["split_source"] == "hash" or (r["split_source"] == "carved" and a["split"] in ("train", "val"))):
            split = a["split"]
        reject = policy == "keep_one" and acting and r["image_id"] != a["image_id"]
        out.append({
            "image_id": r["image_id"], "split_source": r["split_source"], "_split": split,
            "_split_before": r["split"], "_reason": NEAR_DUPLICATE if reject else None,
            "_detail": (f"near-duplicate (pHash within Hamming distance {distance}) of {a['source_path']}"
                        if reject else None),
            "near_dup_group": r["near_dup_group"], "near_dup_size": int(r["near_dup_size"]),
            "near_dup_oversized": bool(r["near_dup_oversized"]),
        })
    return out


def _decided_schema() -> Any:
    import pyarrow as pa

    return pa.schema([("image_id", pa.string()), ("_split", pa.string()), ("_reason", pa.string()),
                      ("_detail", pa.string()), ("near_dup_group", pa.string()), ("near_dup_size", pa.int32()),
                      ("near_dup_oversized", pa.bool_())])


def summarize(members: Sequence[Mapping[str, Any]]) -> Dict[str, Any]:
    """Counts of near-duplicate groups from one row per member (``near_dup_group``, ``near_dup_size``,
    ``near_dup_oversized``, ``_split`` after the policy, ``_split_before``, ``_reason``).

    A group whose kept members are in more than one split is *cross-split*: listed by its splits
    (``"test+train"``), and each of its kept members in split ``s`` counts as a leaked image of
    ``s``. Oversized groups are counted apart (they were left alone).
    """
    splits: Dict[str, set] = {}
    over: Dict[str, bool] = {}
    for r in members:
        g = r["near_dup_group"]
        over[g] = bool(r["near_dup_oversized"])
        if r["_reason"] is None:
            splits.setdefault(g, set()).add(r["_split"])
    cross: Dict[str, int] = {}
    cross_over: Dict[str, int] = {}
    for g, ss in splits.items():
        if len(ss) > 1:
            into = cross_over if over[g] else cross
            key = "+".join(sorted(ss))
            into[key] = into.get(key, 0) + 1
    leaked: Dict[str, int] = {}
    for r in members:
        g = r["near_dup_group"]
        if r["_reason"] is None and len(splits[g]) > 1 and not over[g]:
            leaked[r["_split"]] = leaked.get(r["_split"], 0) + 1
    return {
        "images_in_groups": len(members), "groups": len(over),
        "largest_group": max((int(r["near_dup_size"]) for r in members), default=0),
        "oversized_groups": sum(over.values()),
        "moved": sum(r["_split"] != r["_split_before"] for r in members),
        "rejected": sum(r["_reason"] is not None for r in members),
        "cross_split_groups": dict(sorted(cross.items())),
        "leaked_images": dict(sorted(leaked.items())),
        "oversized_cross_split_groups": dict(sorted(cross_over.items())),
    }


def example_pairs(members: Sequence[Mapping[str, Any]], *, limit: int) -> List[Tuple[str, str]]:
    """Up to ``limit`` pairs of kept images of one group each, for a person to look at.

    Groups spanning the most splits come first (then by group name). From a group: its first
    member (by ``image_id``) of each split, the first two of those by split name; a group in
    one split gives its two smallest ids.
    """
    by_group: Dict[str, List[Mapping[str, Any]]] = {}
    for r in members:
        if r["_reason"] is None:
            by_group.setdefault(r["near_dup_group"], []).append(r)
    ranked = []
    for g, rs in by_group.items():
        if len(rs) < 2:
            continue
        seen: Dict[str, int] = {}
        order = []
        for r in sorted(rs, key=lambda r: r["image_id"]):
            seen[r["_split"]] = seen.get(r["_split"], 0) + 1
            order.append((seen[r["_split"]], r["_split"], r["image_id"]))
        order.sort()
        ranked.append((-len(seen), g, order[0][2], order[1][2]))
    return [(a, b) for _, _, a, b in sorted(ranked)[:limit]]
