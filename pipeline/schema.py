"""The schemas of pixelmill's Parquet outputs, declared once.

Spark ``StructType``s and DDL strings are derived from the field
lists here; nothing else spells out column names and types.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Tuple

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from pyspark.sql.types import StructType

#: Partition column of ``<ingest output>/images/``.
SPLIT_COLUMN = "split"
SPLITS = ("train", "val", "test")
#: Split value of rows ingested without labels or split (``label_source: none``).
UNLABELED_SPLIT = "unlabeled"


@dataclass(frozen=True)
class Field:
    name: str
    numpy_dtype: Any
    spark_type: str  # a Spark SQL DDL type name
    nullable: bool = False


IMAGE_FIELDS: Tuple[Field, ...] = (
    Field("image_id", np.str_, "string"),        # sha256 of the original bytes, hex
    Field("source_path", np.str_, "string"),     # input URI of the file
    Field("label", np.str_, "string", True),     # class name; null when unlabeled
    Field("label_index", np.int32, "int", True),  # index into the manifest's classes
    Field("split", np.str_, "string"),           # train / val / test (partition column)
    Field("height", np.int32, "int"),
    Field("width", np.int32, "int"),
    Field("channels", np.int32, "int"),
    Field("format", np.str_, "string"),          # png / jpeg: the encoding of `image`
    Field("image", np.bytes_, "binary"),         # encoded bytes, exactly what training reads
)

#: Columns of ``images/`` that ingest adds for data quality (``docs/ingest.md`` "Data quality").
#: Readers never require them: outputs written before them lack them, and appends fill them with null.
QUALITY_FIELDS: Tuple[Field, ...] = (
    Field("phash", np.int64, "bigint", True),                   # 64-bit perceptual hash (signed)
    Field("quality_flags", object, "array<string>", True),      # pipeline.imaging.quality.FLAGS raised
    Field("near_dup_group", np.str_, "string", True),           # smallest image_id of its near-duplicate group
)

REJECT_FIELDS: Tuple[Field, ...] = (
    Field("source_path", np.str_, "string"),
    Field("reason", np.str_, "string"),
    Field("detail", np.str_, "string", True),
    Field("image_id", np.str_, "string", True),  # null when the file could not be read
)

IMAGE_COLUMNS = tuple(f.name for f in IMAGE_FIELDS)
QUALITY_COLUMNS = tuple(f.name for f in QUALITY_FIELDS)
#: What ingest writes to ``images/``, in this order.
STORED_IMAGE_COLUMNS = IMAGE_COLUMNS + QUALITY_COLUMNS
REJECT_COLUMNS = tuple(f.name for f in REJECT_FIELDS)


def spark_schema(fields: Tuple[Field, ...]) -> "StructType":
    from pyspark.sql.types import StructField, StructType, _parse_datatype_string

    return StructType([StructField(f.name, _parse_datatype_string(f.spark_type), f.nullable) for f in fields])


def ddl(fields: Tuple[Field, ...]) -> str:
    """``'image_id string, ...'`` for ``mapInPandas`` / ``applyInPandas`` schemas."""
    return ", ".join(f"{f.name} {f.spark_type}" for f in fields)
