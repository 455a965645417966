"""Transform: the DataFrame -> DataFrame steps between the per-image step and the accounting.

Each takes and returns rows of :data:`pipeline.ingest.extract.PROCESSED_DDL` (same columns,
same order) and only changes ``label``, ``reason`` and ``detail``; a row that becomes a
reject drops its image bytes and pixel sums. Composed with ``DataFrame.transform``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

from pipeline.fs import to_uri
from pipeline.imaging.reasons import ALREADY_INGESTED, DUPLICATE, LABEL_CONFLICT, NO_LABEL
from pipeline.ingest.extract import STAT_COLS, norm_source_col

if TYPE_CHECKING:  # pragma: no cover
    from pyspark.sql import Column, DataFrame, SparkSession


def with_manifest_labels(spark: "SparkSession", df: "DataFrame", manifest_uri: str, input_uri: str) -> "DataFrame":
    """Labels from a ``path,label`` CSV; paths relative to the input or absolute URIs. Unlisted files -> ``no_label``."""
    from pyspark.sql import functions as F

    manifest_uri = to_uri(manifest_uri)
    m = spark.read.option("header", "true").schema("path string, label string").csv(manifest_uri)
    base = input_uri.rstrip("/") + "/"
    m = (
        m.filter(F.col("path").isNotNull() & (F.trim("path") != ""))
        .select(
            F.when(F.col("path").rlike(r"^[A-Za-z][A-Za-z0-9+.\-]*:/"), norm_source_col(F.col("path")))
            .otherwise(F.concat(F.lit(base), F.regexp_replace(F.col("path"), r"^/+", "")))
            .alias("_m_path"),
            F.col("label").alias("_m_label"),
        )
        .dropDuplicates(["_m_path"])
    )
    joined = df.join(m, df["source_path"] == m["_m_path"], how="left")
    no_label = F.col("reason").isNull() & (F.col("_m_label").isNull() | (F.trim("_m_label") == ""))
    return joined.select(
        *[c for c in df.columns if c not in ("label", "reason", "detail")],
        F.col("_m_label").alias("label"),
        F.when(no_label, F.lit(NO_LABEL)).otherwise(F.col("reason")).alias("reason"),
        F.when(no_label, F.lit(f"file has no label in {manifest_uri}")).otherwise(F.col("detail")).alias("detail"),
    ).select(*df.columns)


def with_already_ingested(df: "DataFrame", prior_images: "DataFrame", prior_rejects: "DataFrame") -> "DataFrame":
    """Mark files the output already accounts for (same path, same bytes) as ``already_ingested``."""
    from pyspark.sql import functions as F

    known = (
        prior_images.select("source_path", "image_id")
        .unionByName(prior_rejects.select("source_path", "image_id"))
        .dropDuplicates()
        .select(F.col("source_path").alias("_k_path"), F.col("image_id").alias("_k_id"), F.lit(True).alias("_known"))
    )
    cond = (df["source_path"] == known["_k_path"]) & df["image_id"].eqNullSafe(known["_k_id"])
    j = df.join(known, cond, how="left")
    hit = F.col("_known").isNotNull()
    return j.select(
        *[c for c in df.columns if c not in ("reason", "detail")],
        F.when(hit, F.lit(ALREADY_INGESTED)).otherwise(F.col("reason")).alias("reason"),
        F.when(hit, F.lit("same path and bytes are already in the output")).otherwise(F.col("detail")).alias("detail"),
    ).select(*df.columns)


def with_duplicates_resolved(df: "DataFrame") -> "DataFrame":
    """Among accepted candidates with the same ``image_id``: keep the smallest ``source_path``.

    Copies with different labels are all rejected as ``label_conflict``.
    """
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    cand = F.col("reason").isNull()
    w = Window.partitionBy("image_id")
    key = F.when(cand, F.col("source_path"))
    lab = F.when(cand, F.coalesce(F.col("label"), F.lit("\u0000")))
    j = (
        df.withColumn("_kept", F.min(key).over(w))
        .withColumn("_labels", F.array_sort(F.collect_set(lab).over(w)))
    )
    conflict = cand & (F.size("_labels") > 1)
    dup = cand & ~conflict & (F.col("source_path") != F.col("_kept"))
    reason = (F.when(conflict, F.lit(LABEL_CONFLICT)).when(dup, F.lit(DUPLICATE)).otherwise(F.col("reason")))
    detail = (
        F.when(conflict, F.concat(F.lit("same bytes carry labels "), F.array_join("_labels", ", ")))
        .when(dup, F.concat(F.lit("duplicate of "), F.col("_kept")))
        .otherwise(F.col("detail"))
    )
    return _with_reject(j, reason, detail).select(*df.columns)


def with_prior_duplicates(df: "DataFrame", prior_images: "DataFrame") -> "DataFrame":
    """On append: a new copy of an already stored image is a ``duplicate`` (same label) or ``label_conflict``."""
    from pyspark.sql import functions as F

    p = prior_images.select(F.col("image_id").alias("_p_id"), F.col("label").alias("_p_label"),
                            F.col("source_path").alias("_p_path"))
    j = df.join(p, df["image_id"] == p["_p_id"], how="left")
    hit = F.col("reason").isNull() & F.col("_p_id").isNotNull()
    same = F.col("label").eqNullSafe(F.col("_p_label"))
    reason = F.when(hit & same, F.lit(DUPLICATE)).when(hit, F.lit(LABEL_CONFLICT)).otherwise(F.col("reason"))
    detail = (
        F.when(hit & same, F.concat(F.lit("duplicate of "), F.col("_p_path")))
        .when(hit, F.concat(F.lit("label conflicts with "), F.coalesce(F.col("_p_label"), F.lit("(none)")),
                            F.lit(" of "), F.col("_p_path")))
        .otherwise(F.col("detail"))
    )
    return _with_reject(j, reason, detail).select(*df.columns)


def _with_reject(df: "DataFrame", reason: "Column", detail: "Column") -> "DataFrame":
    """Set reason/detail; a rejected row drops its image bytes and stats (they are not stored)."""
    from pyspark.sql import functions as F

    out = df.withColumn("_reason", reason).withColumn("_detail", detail)
    cleared = {c: F.when(F.col("_reason").isNull(), F.col(c)) for c in ("image", *STAT_COLS, "npix", "phash",
                                                                        "quality_flags")}
    return (
        out.withColumns(cleared)
        .withColumn("reason", F.col("_reason"))
        .withColumn("detail", F.col("_detail"))
        .drop("_reason", "_detail")
    )


def with_label_index(df: "DataFrame", classes: Mapping[str, int]) -> "DataFrame":
    """Add ``label_index`` from the class mapping (null without classes or for an unknown label)."""
    from pyspark.sql import functions as F

    if not classes:
        return df.withColumn("label_index", F.lit(None).cast("int"))
    pairs = []
    for k, v in sorted(classes.items()):
        pairs += [F.lit(k), F.lit(int(v))]
    return df.withColumn("label_index", F.create_map(*pairs)[F.col("label")].cast("int"))
