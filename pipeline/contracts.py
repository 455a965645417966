"""What one stage commits for another to read: the output layout's names and the typed files.

Every file or folder name of the output layout is a constant here, and each file
that crosses a stage boundary has one typed model and one reader/writer that does
all its checks:

* :class:`IngestManifest` - ``<ingest out>/_manifest.json``: :func:`read_manifest`, :func:`write_manifest`;
* :class:`ModelCard` - ``<model dir>/model.json``: :func:`read_model_card`, :func:`write_model_card`.

The models are read-only views that also answer ``m["key"]`` / ``m.get("key")`` like the
JSON they were read from; unknown keys are kept (an older or newer writer's extra fields
survive a read-modify-write), missing required keys are an error that says what to rerun.
docs/contracts.md documents the fields.
"""
from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Tuple

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.errors import DataError
from pipeline.fs import FileSystem, filesystem, join, parent_and_name, to_uri

if TYPE_CHECKING:  # pragma: no cover
    from pyspark.sql import DataFrame, SparkSession

    from pipeline.commit import Committed

# --- the output layout: every name, once ---------------------------------------------

#: Marker written last into a committed output (see :mod:`pipeline.commit`).
COMMIT_MARKER = "_PIXELMILL_COMMITTED"
#: Prefix of the staging folders a writer uses next to its output.
STAGING_PREFIX = "._pixelmill_staging-"

# ingest output
MANIFEST = "_manifest.json"
IMAGES_DIR = "images"
REJECTS_DIR = "rejects"
#: Thumbnails of flagged images and near-duplicate pairs that the run report shows.
QUALITY_EXAMPLES = "_quality_examples.json"
MANIFEST_VERSION = 1

# training output (model dir)
MODEL_CARD = "model.json"
MODEL_SUBDIR = "model"
MODEL_FILE = "model.keras"
#: The SavedModel beside ``model.keras`` (``<model_dir>/model/saved_model/``, :mod:`pipeline.train.serving`).
SAVED_MODEL_DIR = "saved_model"
CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_COMPLETE = "_COMPLETE"
HISTORY_CSV = "history.csv"
CURVES_PNG = "training_curves.png"
TENSORBOARD_DIR = "tensorboard"
PROGRESS_FILE = "_progress.json"

# score output
PREDICTIONS_DIR = "predictions"
METRICS_FILE = "_metrics.json"
CONFUSION_PNG = "confusion_matrix.png"
METRICS_VERSION = 1


def model_file_uri(model_dir: str) -> str:
    """``<model_dir>/model/model.keras``."""
    return join(model_dir, MODEL_SUBDIR, MODEL_FILE)


def saved_model_uri(model_dir: str) -> str:
    """``<model_dir>/model/saved_model``."""
    return join(model_dir, MODEL_SUBDIR, SAVED_MODEL_DIR)


# --- the typed files -------------------------------------------------------------------

class _Contract(BaseModel):
    """A frozen model that also reads like the JSON mapping it came from."""

    model_config = ConfigDict(frozen=True, extra="allow")

    def __getitem__(self, key: str) -> Any:
        try:
            return self.to_dict()[key]
        except KeyError:
            raise KeyError(key) from None

    def get(self, key: str, default: Any = None) -> Any:
        return self.to_dict().get(key, default)

    def __contains__(self, key: object) -> bool:
        return key in self.to_dict()

    def to_dict(self) -> Dict[str, Any]:
        """Every field, defaults included (what ``m["key"]`` reads)."""
        return self.model_dump(mode="json")

    def to_json_dict(self) -> Dict[str, Any]:
        """The fields that were given (what a writer stores): a read-then-write keeps the file as it was."""
        return self.model_dump(mode="json", exclude_unset=True)


class ImageBlock(_Contract):
    """What every stored image is: size, channels, color mode and encoding."""

    height: int = Field(ge=1)
    width: int = Field(ge=1)
    channels: int = Field(ge=1, le=4)
    color_mode: str = "RGB"
    format: str = "png"


class IngestManifest(_Contract):
    """``<ingest out>/_manifest.json``: counts that add up, classes, image spec, train stats."""

    version: int = MANIFEST_VERSION
    input_uri: Optional[str] = None
    output_uri: Optional[str] = None
    files_seen: int = 0
    accepted: int = 0
    rejected: Dict[str, int] = Field(default_factory=dict)
    splits: Dict[str, int]
    class_counts: Dict[str, int] = Field(default_factory=dict)
    classes: Dict[str, int] = Field(default_factory=dict)
    image: ImageBlock
    stats: Dict[str, Any] = Field(default_factory=dict)
    row_groups: Dict[str, int] = Field(default_factory=dict)
    config: Dict[str, Any] = Field(default_factory=dict)
    #: Per input URI, when its latest ingest started listing (UTC ISO 8601; absent in earlier outputs).
    listed_at: Dict[str, str] = Field(default_factory=dict)

    def class_order(self) -> Tuple[str, ...]:
        """Class names in index order."""
        return tuple(n for n, _ in sorted(self.classes.items(), key=lambda kv: kv[1]))


class ModelCard(_Contract):
    """``<model dir>/model.json``: what the exported model expects and how it was made."""

    model_id: str
    classes: Dict[str, int]
    image: ImageBlock
    normalization: Dict[str, List[float]]
    created_utc: Optional[str] = None
    ingest_manifest_sha256: Optional[str] = None
    #: The ingest version trained on: ``uri``, ``version`` (null for the earlier layout), ``root``, ``manifest_sha256``.
    data_snapshot: Optional[Dict[str, Any]] = None
    epochs_completed: Optional[int] = None
    metrics: Dict[str, Any] = Field(default_factory=dict)
    stack: Dict[str, Any] = Field(default_factory=dict)
    config: Dict[str, Any] = Field(default_factory=dict)


def _first_error(err: ValidationError) -> str:
    e = err.errors()[0]
    where = ".".join(str(p) for p in e["loc"]) or "(top level)"
    return f"'{where}': {e['msg']}"


# --- the ingest manifest ------------------------------------------------------------------

def resolve_ingest(data_uri: str, fs: Optional[FileSystem] = None, *, spark: Optional["SparkSession"] = None,
                   version: Optional[int] = None) -> "Committed":
    """The committed version of the ingest output ``data_uri`` (newest, or ``version``).

    Raises :class:`DataError` naming what to run when ``data_uri`` does not exist or holds no
    committed version (a crashed or running ingest). Readers resolve once and read
    :attr:`~pipeline.commit.Committed.root` from then on, so one run reads one version.
    """
    from pipeline.commit import resolve

    data_uri = to_uri(data_uri)
    fs = fs or filesystem(data_uri, spark)
    return resolve(fs, data_uri, version,
                   missing=f"ingest output {data_uri} does not exist: run ingest first, or pass the ingest --output URI",
                   uncommitted=f"{data_uri} is not a committed ingest output (no snapshot and no {COMMIT_MARKER}): "
                   "re-run ingest (a crashed or running ingest commits nothing)")


def resolve_scores(score_uri: str, fs: Optional[FileSystem] = None, *, version: Optional[int] = None) -> "Committed":
    """The newest committed version of a score output, or ``version`` (see :func:`resolve_ingest`)."""
    from pipeline.commit import resolve

    score_uri = to_uri(score_uri)
    fs = fs or filesystem(score_uri)
    return resolve(fs, score_uri, version,
                   missing=f"score output {score_uri} does not exist: run score first, or pass the score --output URI",
                   uncommitted=f"{score_uri} is not a committed score output: re-run score (a crashed or running "
                   "scoring commits nothing)")


def split_folders(data: "Committed", split: str) -> List[str]:
    """The folders holding ``split``'s rows in version ``data``, oldest first.

    A version written by an append lists the folders of the versions before it as well as
    its own (each append writes only its new rows); an output of the earlier layout has one
    ``<root>/images/split=<s>/``. Empty when the split has no rows.
    """
    from pipeline.schema import SPLIT_COLUMN

    suffix = f"{IMAGES_DIR}/{SPLIT_COLUMN}={split}"
    if not any(f.kind == "images" for f in data.files):  # the earlier layout: one folder per split
        return [join(data.root, suffix)]
    return [join(data.uri, f.path) for f in data.files
            if f.kind == "images" and f.rows > 0 and (f.path == suffix or f.path.endswith("/" + suffix))]


def read_split_images(spark: "SparkSession", data: "Committed", splits: Sequence[str]) -> "DataFrame":
    """The stored images of ``splits`` (each with rows) of version ``data`` as one DataFrame: each
    split read from the folders :func:`split_folders` names, with its name as the ``split`` column."""
    from functools import reduce

    from pyspark.sql import functions as F

    from pipeline.schema import SPLIT_COLUMN

    return reduce(lambda a, b: a.unionByName(b), [
        spark.read.parquet(*split_folders(data, s)).withColumn(SPLIT_COLUMN, F.lit(s)) for s in splits])


def listed_folders(data: "Committed", kind: str, default: str) -> List[str]:
    """The folders of ``kind`` version ``data``'s snapshot lists (an appended version lists earlier
    versions' folders too), oldest first; ``<root>/<default>`` for a version that lists none."""
    if not any(f.kind == kind for f in data.files):
        return [join(data.root, default)]
    return [join(data.uri, f.path) for f in data.files if f.kind == kind]


def prediction_folders(scores: "Committed") -> List[str]:
    """The folders holding the predictions of score version ``scores`` (``score --mode append``
    writes only its new rows and lists the earlier folders)."""
    return listed_folders(scores, "predictions", PREDICTIONS_DIR)


def reject_folders(data: "Committed") -> List[str]:
    """The folders holding the rejects of version ``data`` (see :func:`split_folders`)."""
    return listed_folders(data, "rejects", REJECTS_DIR)


def read_manifest(data_uri: str, fs: Optional[FileSystem] = None, *,
                  spark: Optional["SparkSession"] = None) -> IngestManifest:
    """The manifest of the newest committed version of an ingest output, with every check done once.

    ``data_uri`` is the output or a version folder :func:`resolve_ingest` returned. Raises
    :class:`DataError` naming what to run when ``data_uri`` does not exist, is not committed
    (a crashed or running ingest), has no or an unreadable manifest, or one of another
    version or shape.
    """
    data_uri = to_uri(data_uri)
    fs = fs or filesystem(data_uri, spark)
    root = resolve_ingest(data_uri, fs).root
    path = join(root, MANIFEST)
    raw = _read_json_object(fs, path, missing=f"{data_uri} has no {MANIFEST}: it was not written by pixelmill "
                            "ingest (re-run ingest)", fix="re-run ingest")
    return parse_manifest(raw, path)


def _read_json_object(fs: FileSystem, uri: str, *, missing: str, fix: str) -> Mapping[str, Any]:
    """The JSON object at ``uri``; DataError ``missing`` when absent, naming ``fix`` when unreadable."""
    if not fs.exists(uri):
        raise DataError(missing)
    try:
        raw = fs.read_json(uri)
    except ValueError as e:
        raise DataError(f"{uri} is not valid JSON ({e}): {fix}") from None
    if not isinstance(raw, Mapping):
        raise DataError(f"{uri} does not hold a JSON object: {fix}")
    return raw


def parse_manifest(raw: Any, where: str) -> IngestManifest:
    """Validate a manifest's JSON (see :func:`read_manifest`)."""
    if not isinstance(raw, Mapping):
        raise DataError(f"{where} does not hold a JSON object: re-run ingest")
    if raw.get("version", MANIFEST_VERSION) != MANIFEST_VERSION:
        raise DataError(f"{where} has manifest version {raw.get('version')!r}, expected {MANIFEST_VERSION}: "
                        "re-ingest with --mode overwrite")
    for key in ("splits", "image"):
        if key not in raw:
            raise DataError(f"{where} has no '{key}': it was written by another tool (re-run ingest)")
    try:
        return IngestManifest.model_validate(raw)
    except ValidationError as e:
        raise DataError(f"{where} has a bad entry {_first_error(e)}: re-run ingest") from None


def write_manifest(fs: FileSystem, out_uri: str, manifest: Mapping[str, Any]) -> IngestManifest:
    """Validate and write ``<out_uri>/_manifest.json``; returns the typed manifest."""
    m = manifest if isinstance(manifest, IngestManifest) else IngestManifest.model_validate(dict(manifest))
    fs.write_json(join(out_uri, MANIFEST), m.to_json_dict())
    return m


def manifest_sha256(data_uri: str, fs: Optional[FileSystem] = None) -> str:
    """sha256 of the manifest's bytes: what a model card records as ``ingest_manifest_sha256``."""
    fs = fs or filesystem(data_uri)
    return hashlib.sha256(fs.read_bytes(join(resolve_ingest(data_uri, fs).root, MANIFEST))).hexdigest()


# --- the model card -------------------------------------------------------------------------

def resolve_model_dir(fs: FileSystem, model_uri: str) -> str:
    """The training ``--model-dir`` for ``model_uri`` (the dir itself, its ``model/`` or ``model.keras``)."""
    u = model_uri.rstrip("/")
    parent, name = parent_and_name(u)
    if name == MODEL_FILE:
        u, (parent, name) = parent, parent_and_name(parent)
    if fs.exists(model_file_uri(u)):
        return u
    if name == MODEL_SUBDIR and fs.exists(join(u, MODEL_FILE)):
        return parent
    hint = ""
    if fs.exists(join(u, CHECKPOINTS_DIR)):
        hint = "; training left checkpoints but no exported model: let it finish (rerun train with --mode resume)"
    raise DataError(f"no trained model at {model_uri}: expected <model-dir>/{MODEL_SUBDIR}/{MODEL_FILE} and "
                    f"<model-dir>/{MODEL_CARD} (pass a finished training's --model-dir or its model/ to --model){hint}")


def read_model_card(fs: FileSystem, model_dir: str) -> ModelCard:
    """``<model_dir>/model.json``, checked: required keys, class indices 0..k-1, channels agree."""
    uri = join(model_dir, MODEL_CARD)
    raw = _read_json_object(fs, uri, missing=f"{uri} is missing: the model has no description (re-export it with "
                            "train)", fix="re-export the model with train")
    for key in ("model_id", "classes", "image", "normalization"):
        if key not in raw:
            raise DataError(f"{uri} lacks '{key}': re-export the model with train")
    classes = raw["classes"]
    if not isinstance(classes, Mapping) or not classes:
        raise DataError(f"{uri}: 'classes' must map class names to indices 0..k-1")
    try:
        indices = sorted(int(i) for i in classes.values())
    except (TypeError, ValueError):
        raise DataError(f"{uri}: 'classes' must map class names to indices 0..k-1") from None
    if indices != list(range(len(classes))):
        raise DataError(f"{uri}: class indices must be 0..{len(classes) - 1}, got {indices}")
    try:
        card = ModelCard.model_validate(raw)
    except ValidationError as e:
        raise DataError(f"{uri} has a bad 'image' or 'normalization' entry ({_first_error(e)}): "
                        "re-export the model") from None
    norm = card.normalization
    if "mean" not in norm or "std" not in norm:
        raise DataError(f"{uri} has a bad 'image' or 'normalization' entry (needs mean and std): re-export the model")
    if len(norm["mean"]) != card.image.channels or len(norm["std"]) != card.image.channels:
        raise DataError(f"{uri}: normalization has {len(norm['mean'])} channel(s) but image has {card.image.channels}")
    return card


def write_model_card(fs: FileSystem, model_dir: str, card: Mapping[str, Any]) -> ModelCard:
    """Validate and write ``<model_dir>/model.json`` (written after the model file it describes)."""
    c = card if isinstance(card, ModelCard) else ModelCard.model_validate(dict(card))
    fs.write_json(join(model_dir, MODEL_CARD), c.to_json_dict())
    return c


def class_order(classes: Mapping[str, int]) -> Tuple[str, ...]:
    """Class names in index order."""
    return tuple(n for n, _ in sorted(classes.items(), key=lambda kv: int(kv[1])))
