"""Typed, validated configuration loaded from YAML files in ``conf/``.

The schema is declared once, here, as frozen pydantic models; defaults live in
the models so an installed wheel works without the repository. Loading order:

1. ``conf/base.yaml`` (when the conf directory is found),
2. each ``--config FILE`` in the order given,
3. each ``--set a.b=value`` override (value parsed as YAML: ``3``, ``true``,
   ``[1, 2]``, ``null``).

Unknown keys, wrong types and out-of-range values raise :class:`ConfigError`
with one line naming the key, e.g.
``config key 'train.epochs': Input should be greater than or equal to 1 (got 0)``.
"""
from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any, Dict, Literal, Mapping, Optional, Sequence, Tuple, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.errors import ConfigError

CONF_DIR_ENV = "PIXELMILL_CONF_DIR"


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class SparkConfig(_Section):
    """How the SparkSession is built (see :mod:`pipeline.spark`)."""

    #: Master URL; ignored when spark-submit already set one. ``null`` = require spark-submit's.
    #: The default uses every core and retries a failed task up to 4 times (``local[N]`` never retries).
    master: Optional[str] = "local[*,4]"
    app_name: str = "pixelmill"
    log_level: Literal["ALL", "DEBUG", "INFO", "WARN", "ERROR", "OFF"] = "WARN"
    ui_enabled: bool = True
    #: Extra Spark confs, applied after pixelmill's small-machine defaults.
    conf: Dict[str, str] = Field(default_factory=dict)

    @field_validator("log_level", mode="before")
    @classmethod
    def _yaml_off(cls, v: Any) -> Any:
        # YAML 1.1 reads a bare ``OFF`` as false: take it as the level the user wrote.
        return "OFF" if v is False else (v.upper() if isinstance(v, str) else v)

    @field_validator("conf", mode="before")
    @classmethod
    def _stringify(cls, v: Any) -> Any:
        if isinstance(v, Mapping):
            return {str(k): (str(x).lower() if isinstance(x, bool) else str(x)) for k, x in v.items()}
        return v


QualityFlag = Literal["dark", "bright", "low_information", "blurry", "upscaled", "extreme_aspect"]


class QualityConfig(_Section):
    """When an image measure becomes a quality flag (:mod:`pipeline.imaging.quality`, ``docs/ingest.md``)."""

    #: Mean luminance (0..255) below which an image is ``dark``, above which it is ``bright``.
    dark_below: float = Field(20.0, ge=0, le=255)
    bright_above: float = Field(235.0, ge=0, le=255)
    #: Entropy (bits, 0..8) of the luminance histogram below which an image is ``low_information``.
    low_information_below: float = Field(2.0, ge=0, le=8)
    #: Variance of the Laplacian of the stored-size luminance below which an image is ``blurry``.
    blurry_below: float = Field(20.0, ge=0)
    #: The stored size over the original's (larger side ratio) above which an image is ``upscaled``.
    upscaled_above: float = Field(2.0, ge=1)
    #: The original's long side over its short side above which it has an ``extreme_aspect``.
    aspect_above: float = Field(3.0, ge=1)


class IngestConfig(_Section):
    """Cleaning, normalising and partitioning raw images (see :mod:`pipeline.ingest`)."""

    image_extensions: Tuple[str, ...] = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp")
    #: Stored image size, (height, width): training reads exactly these bytes.
    height: int = Field(64, ge=8, le=4096)
    width: int = Field(64, ge=8, le=4096)
    color_mode: Literal["RGB", "L"] = "RGB"
    resize_policy: Literal["center_crop", "pad", "stretch"] = "center_crop"
    encode_format: Literal["png", "jpeg"] = "png"
    jpeg_quality: int = Field(95, ge=1, le=100)
    #: Decode large JPEG originals at a reduced DCT scale (1/2, 1/4, 1/8: still at least the
    #: stored size) before the final resize: several times less work on camera photos.
    jpeg_reduced_decode: bool = True
    #: zlib level of stored PNGs: 1 is ~3x faster to write than 6 for ~8% more bytes (lossless either way).
    png_compress_level: int = Field(1, ge=0, le=9)
    min_side: int = Field(8, ge=1)
    #: Decompression-bomb limit: images with more pixels are rejected before a full decode.
    max_pixels: int = Field(40_000_000, ge=64)
    max_file_mb: int = Field(256, ge=1)
    animated: Literal["first_frame", "reject"] = "first_frame"
    #: Grey level (0..255) transparent pixels are flattened onto (RGBA, LA, palette with transparency).
    alpha_background: int = Field(255, ge=0, le=255)
    #: Grey level (0..255) of the border added by resize_policy ``pad``.
    pad_value: int = Field(0, ge=0, le=255)
    #: Fractions used when the input layout does not give the split.
    split_fractions: Dict[Literal["train", "val", "test"], float] = Field(
        default_factory=lambda: {"train": 0.8, "val": 0.1, "test": 0.1}
    )
    #: When the layout has ``train/`` but no ``val/`` (or ``validation/``) folder, move a
    #: ``val / (train + val)`` share of train into val by content hash (e.g. Fashion-MNIST's train/test).
    carve_val_from_train: bool = True
    #: Who lists the input: ``spark`` (Spark's file index on the driver: one status object per file
    #: there before the first task) or ``executors`` (the driver lists folder names only; executor
    #: tasks list each folder and read the files through pipeline.fs: for millions of files).
    #: ``--input-list`` always lists on executors.
    listing: Literal["spark", "executors"] = "spark"
    label_source: Literal["folders", "manifest", "none"] = "folders"
    #: CSV ``path,label`` used when label_source is ``manifest``.
    manifest_uri: Optional[str] = None
    allow_new_classes: bool = False
    #: Target size of one Parquet file.
    target_file_mb: int = Field(64, ge=1)
    #: Largest number of training processes; the train split gets >= 4x this many row groups.
    max_train_procs: int = Field(8, ge=1, le=1024)
    #: Largest number of rows per Arrow batch handed to Python workers (fewer when files are large:
    #: a batch holds at most about 64 MiB of input bytes).
    batch_rows: int = Field(512, ge=1, le=100_000)
    #: Seed for the within-split row shuffle and the hash split.
    seed: int = 0
    quality: QualityConfig = Field(default_factory=QualityConfig)
    #: Quality flags that reject an image (reason ``quality_flag``); others are only reported.
    reject_flags: Tuple[QualityFlag, ...] = ()
    #: What a near-duplicate group (perceptual hashes within near_dup_distance) does to the splits:
    #: ``same_split`` moves hash-placed members into the split of the group's earliest member
    #: (given split folders win; a group spanning given splits is a reported leak), ``keep_one``
    #: keeps the earliest member and rejects the others (``near_duplicate``), ``report`` only counts,
    #: ``off`` does not look for them (hashes and flags are still stored).
    near_duplicates: Literal["same_split", "keep_one", "report", "off"] = "same_split"
    #: Largest Hamming distance (of 64 bits) between the pHashes of two near-duplicates; 0 = equal hashes.
    near_dup_distance: int = Field(4, ge=0, le=16)
    #: A group with more members than this is reported as oversized and left alone (a distance too
    #: loose for the data chains look-alike images together).
    near_dup_max_group: int = Field(64, ge=2)
    #: Committed versions of the output kept (a reader of one keeps reading it while newer ones
    #: commit); the writer removes older ones after its commit.
    retain_versions: int = Field(2, ge=1, le=1000)
    #: On append, files stored in the output and not modified since the previous ingest of the
    #: same input listed it are ``already_ingested`` without being read (false: read every file).
    skip_unchanged: bool = True
    #: Clock skew allowed between the driver and the storage's modification times: a file counts as
    #: unchanged only when modified more than this many seconds before the previous listing.
    unchanged_margin_s: int = Field(300, ge=0)

    @field_validator("near_duplicates", mode="before")
    @classmethod
    def _yaml_off(cls, v: Any) -> Any:
        # YAML 1.1 reads a bare ``off`` as false: take it as the word the user wrote.
        return "off" if v is False else v

    @field_validator("image_extensions", mode="after")
    @classmethod
    def _norm_ext(cls, v: Tuple[str, ...]) -> Tuple[str, ...]:
        out = []
        for e in v:
            e = e.strip().lower()
            if not e:
                raise ValueError("empty extension")
            out.append(e if e.startswith(".") else "." + e)
        return tuple(out)

    @field_validator("split_fractions", mode="after")
    @classmethod
    def _fractions(cls, v: Dict[str, float]) -> Dict[str, float]:
        if any(x < 0 for x in v.values()):
            raise ValueError(f"fractions must be >= 0, got {v}")
        if abs(sum(v.values()) - 1.0) > 1e-6:
            raise ValueError(f"fractions must sum to 1.0, got {sum(v.values()):.4f}")
        if v.get("train", 0) <= 0:
            raise ValueError("train fraction must be > 0")
        return v

    @model_validator(mode="after")
    def _manifest(self) -> "IngestConfig":
        if self.label_source == "manifest" and not self.manifest_uri:
            raise ValueError("label_source 'manifest' needs ingest.manifest_uri")
        return self


class AugmentConfig(_Section):
    flip_left_right: bool = True
    #: Pad by this many pixels then randomly crop back (0 = off).
    crop_pad: int = Field(0, ge=0, le=64)
    #: Random resized crop (the photo augmentation): a window of ``crop_scale`` of the area and
    #: ``crop_ratio`` aspect, resized back to the stored size; JPEGs decode only the window.
    random_resized_crop: bool = False
    crop_scale: Tuple[float, float] = (0.08, 1.0)
    crop_ratio: Tuple[float, float] = (0.75, 4 / 3)

    @field_validator("crop_scale", "crop_ratio", mode="after")
    @classmethod
    def _range(cls, v: Tuple[float, float], info: Any) -> Tuple[float, float]:
        lo, hi = v
        top = 1.0 if info.field_name == "crop_scale" else 10.0
        if not 0 < lo <= hi <= top:
            raise ValueError(f"needs 0 < low <= high <= {top:g}, got [{lo}, {hi}]")
        return v


class LoaderConfig(_Section):
    """Petastorm readers into tf.data (see :mod:`pipeline.dataset`)."""

    reader_pool_type: Literal["thread", "process", "dummy"] = "thread"
    #: Petastorm reader threads. 1 keeps the row order reproducible (more threads return row groups in
    #: timing-dependent order) and measured faster than 2 on a 2-core machine (docs/dataset.md).
    workers_count: int = Field(1, ge=1, le=64)
    results_queue_size: int = Field(8, ge=1, le=1024)
    shuffle_buffer: int = Field(4096, ge=0)
    #: ``manifest`` = per-channel mean/std recorded by ingest; ``unit`` = x/255; ``none`` = raw 0..255.
    normalize: Literal["manifest", "unit", "none"] = "manifest"
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    prefetch: int = Field(-1, ge=-1, description="-1 = AUTOTUNE")
    #: Training: when a rank's shard decoded to uint8 fits in this many MiB, the first pass streams
    #: from Parquet as usual and keeps the decoded pixels; later passes reshuffle them in memory with
    #: no reading or decoding. 0 = always stream (docs/dataset.md, "Decoded cache").
    cache_max_mb: int = Field(512, ge=0, le=1_048_576)


class EarlyStoppingConfig(_Section):
    metric: Literal["val_loss", "val_accuracy"] = "val_accuracy"
    patience: int = Field(3, ge=0)
    min_delta: float = Field(0.0, ge=0)


class TrainConfig(_Section):
    """Horovod-on-Spark training (see :mod:`pipeline.train`)."""

    #: ``compact_cnn`` / ``resnet`` (from scratch, inputs normalised by ``loader.normalize``) or a Keras application
    #: backbone: ``resnet50``, ``resnet101``, ``mobilenet_v3_small``, ``mobilenet_v3_large``, ``efficientnet_v2_b0``,
    #: ``convnext_tiny`` (images of at least 32x32; the model does its own preprocessing, so the loader feeds raw
    #: 0..255 pixels whatever ``loader.normalize`` says; grey images are repeated to RGB inside the model).
    model: Literal["compact_cnn", "resnet", "resnet50", "resnet101", "mobilenet_v3_small", "mobilenet_v3_large",
                   "efficientnet_v2_b0", "convnext_tiny"] = "compact_cnn"
    #: Weights a fresh run starts from: null = random; ``imagenet`` = the backbone's standard Keras no-top file in
    #: ``$KERAS_HOME/models/`` (never downloaded); a URI of a ``*.weights.h5`` / ``*.keras`` file holding the
    #: backbone; or a URI of an earlier model-dir (warm start: backbone and head when the classes match, else the
    #: backbone with a new head). Ignored when resuming from a checkpoint.
    init_weights: Optional[str] = None
    #: Fine-tuning schedule (docs/train.md): epochs 1..freeze_epochs train only the head, the backbone (every layer
    #: but the head) frozen and called in inference mode; then the backbone trains too, whole or from the layer named
    #: ``unfreeze_from`` on, with its own optimizer at ``backbone_lr_multiplier`` x the head's learning rate.
    freeze_epochs: int = Field(0, ge=0, le=10_000)
    unfreeze_from: Optional[str] = None
    backbone_lr_multiplier: float = Field(1.0, gt=0, le=1000)
    #: Gradients on the wire: ``fp16`` halves the allreduce bytes (Horovod's fp16 compression).
    compression: Literal["none", "fp16"] = "none"
    #: Horovod tensor fusion buffer (HOROVOD_FUSION_THRESHOLD) in MiB; null = Horovod's default (64).
    fusion_threshold_mb: Optional[float] = Field(None, ge=0, le=16_384)
    #: Micro-batches of ``batch_size`` per optimizer update: their gradients are summed locally and allreduced once.
    accumulate_steps: int = Field(1, ge=1, le=4096)
    num_proc: int = Field(2, ge=1, le=1024)
    epochs: int = Field(10, ge=1, le=10_000)
    #: Per-process batch size.
    batch_size: int = Field(64, ge=1, le=65_536)
    #: Learning rate for one process; scaled linearly by the number of processes.
    learning_rate: float = Field(1e-3, gt=0, le=10)
    warmup_epochs: float = Field(1.0, ge=0)
    #: After warm-up: ``constant`` keeps the peak rate, ``cosine`` decays it to ``min_lr_ratio`` x peak
    #: over the remaining planned steps (``train.epochs``).
    lr_schedule: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    optimizer: Literal["adam", "sgd"] = "adam"
    weight_decay: float = Field(0.0, ge=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    #: Per-class loss weights: null = none; ``balanced`` = n_train / (n_classes x n_class) from the train split's
    #: class counts; or ``{class name: weight > 0}`` (classes left out weigh 1). See :mod:`pipeline.train.class_weights`.
    class_weight: Optional[Union[Literal["balanced"], Dict[str, float]]] = None
    dropout: float = Field(0.25, ge=0, lt=1)
    #: compact_cnn: filters of the first block (doubled per block, at most 4x this) and 3x3 convs per block.
    width: int = Field(32, ge=4, le=1024)
    convs_per_block: int = Field(2, ge=1, le=4)
    early_stopping: EarlyStoppingConfig = Field(default_factory=EarlyStoppingConfig)
    seed: int = 42
    mixed_precision: bool = False
    #: TensorFlow threads per process (0 = TF default).
    intra_op_threads: int = Field(0, ge=0)
    inter_op_threads: int = Field(0, ge=0)
    #: Seconds to wait for all Horovod processes to start.
    start_timeout: int = Field(120, ge=5)
    #: Seconds one training step may take before a silent rank is declared dead.
    step_timeout: int = Field(300, ge=5)
    #: Network interfaces Horovod may use (``["lo"]`` keeps local runs on loopback); null = let Horovod pick.
    nics: Optional[Tuple[str, ...]] = ("lo",)
    #: Horovod's background cycle (HOROVOD_CYCLE_TIME). Every cycle the ranks negotiate over Gloo, which costs
    #: CPU the training steps need when all cores train: 10 ms suits CPU steps of 50+ ms; GPUs want 1 (gpu.yaml).
    cycle_time_ms: float = Field(10.0, ge=0.0, le=1000.0)
    verbose: int = Field(1, ge=0, le=2)
    #: Newest epoch checkpoints kept in ``<model_dir>/checkpoints`` (the best epoch's is kept too).
    keep_checkpoints: int = Field(2, ge=1, le=1000)
    #: Export the weights of the best epoch by ``early_stopping.metric`` (false = the last epoch's).
    restore_best: bool = True

    @field_validator("class_weight", mode="before")
    @classmethod
    def _class_weight(cls, v: Any) -> Any:
        if isinstance(v, Mapping):
            bad = {str(k): w for k, w in v.items()
                   if isinstance(w, bool) or not isinstance(w, (int, float)) or not w > 0 or w == float("inf")}
            if bad or not v:
                raise ValueError("weights must be a mapping of class name to a number > 0" +
                                 (f", got {bad}" if bad else ", got an empty mapping"))
            return {str(k): float(w) for k, w in v.items()}
        if v is not None and v != "balanced":
            raise ValueError(f"must be null, balanced or a mapping of class name to weight, got {v!r}")
        return v


class ScoreConfig(_Section):
    """Distributed batch scoring (see :mod:`pipeline.score`)."""

    batch_size: int = Field(256, ge=1, le=65_536)
    top_k: int = Field(3, ge=1, le=100)
    #: Column the predictions are partitioned by (null = unpartitioned).
    partition_by: Optional[Literal["split", "pred_label", "label"]] = "split"
    #: TensorFlow threads per Python worker; 1 keeps N task slots on N cores (0 = TF default).
    intra_op_threads: int = Field(1, ge=0, le=256)
    inter_op_threads: int = Field(1, ge=0, le=256)
    #: Input tasks per task slot (the files split along row groups, no shuffle); >1 evens out slow tasks.
    tasks_per_slot: int = Field(2, ge=1, le=64)
    #: Committed versions of the predictions kept; the writer removes older ones after its commit.
    retain_versions: int = Field(2, ge=1, le=1000)


class TrackingConfig(_Section):
    """MLflow tracking of training and scoring (see :mod:`pipeline.tracking`)."""

    enabled: bool = True
    #: Tracking server or store; null = ``$MLFLOW_TRACKING_URI``, else a local SQLite store beside the model dir
    #: (``<model_dir>/../mlruns/mlflow.db``).
    uri: Optional[str] = None
    experiment: str = Field("pixelmill", min_length=1)
    #: Logging calls waiting for the background thread at most; more are dropped (one warning), never waited for.
    queue_size: int = Field(1000, ge=1, le=1_000_000)
    #: Seconds the end of a job waits for pending logging (artifacts) before leaving it behind.
    flush_timeout_s: float = Field(60.0, ge=0, le=3600)
    #: Seconds one request to the tracking server may take (MLFLOW_HTTP_REQUEST_TIMEOUT of the logging thread).
    request_timeout_s: int = Field(10, ge=1, le=600)


class Config(_Section):
    spark: SparkConfig = Field(default_factory=SparkConfig)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    loader: LoaderConfig = Field(default_factory=LoaderConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    score: ScoreConfig = Field(default_factory=ScoreConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-able dict, with secret-looking Spark confs redacted."""
        d = self.model_dump(mode="json")
        d["spark"]["conf"] = redact_conf(d["spark"]["conf"])
        return d


_SECRET = re.compile(r"(secret|password|passwd|token|credential|access\.?key|private)", re.IGNORECASE)


def redact_conf(conf: Mapping[str, str]) -> Dict[str, str]:
    """Replace the values of keys that look like secrets with ``*********(redacted)``."""
    return {k: ("*********(redacted)" if _SECRET.search(k) else v) for k, v in conf.items()}


def conf_dir() -> Optional[Path]:
    """The conf directory: ``$PIXELMILL_CONF_DIR`` or ``conf/`` next to the package."""
    env = os.environ.get(CONF_DIR_ENV)
    if env:
        return Path(env)
    here = Path(__file__).resolve().parents[1] / "conf"
    return here if here.is_dir() else None


def _deep_merge(base: Dict[str, Any], extra: Mapping[str, Any]) -> Dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict) and k != "conf":
            out[k] = _deep_merge(out[k], v)
        elif isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = {**out[k], **v}
        else:
            out[k] = copy.deepcopy(v)
    return out


def _read_yaml(path: Path) -> Dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path} (pass an existing YAML file to --config)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    return data


def parse_override(item: str) -> Tuple[Tuple[str, ...], Any]:
    """``'train.epochs=3'`` -> ``(('train', 'epochs'), 3)``."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not p for p in key.split(".")):
        raise ConfigError(f"--set expects KEY=VALUE with a dotted key such as train.epochs=3, got {item!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    parts = tuple(key.split("."))
    # Spark confs have dots in their own names: spark.conf.spark.sql.x=1
    if parts[:2] == ("spark", "conf") and len(parts) > 2:
        parts = ("spark", "conf", ".".join(parts[2:]))
    return parts, value


def _apply_override(data: Dict[str, Any], parts: Sequence[str], value: Any) -> None:
    node = data
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {'.'.join(parts)}: '{p}' is a value, not a section")
        node = nxt
    node[parts[-1]] = value


def format_validation_error(err: ValidationError) -> str:
    """One line naming the config key a validation error is about (and the allowed keys or the bad value)."""
    e = err.errors()[0]
    key = ".".join(str(p) for p in e["loc"])
    msg = e["msg"]
    if e["type"] == "extra_forbidden":
        section = e["loc"][:-1]
        model: Any = Config
        for s in section:
            f = model.model_fields.get(str(s))
            model = f.annotation if f is not None else None
            if not (isinstance(model, type) and issubclass(model, BaseModel)):
                model = None
                break
        allowed = ", ".join(sorted(model.model_fields)) if model else ""
        return f"unknown config key '{key}'" + (f" (allowed: {allowed})" if allowed else "")
    if e["type"] == "literal_error":
        return f"config key '{key}': {msg} (got {e.get('input')!r})"
    got = e.get("input")
    got_s = "" if isinstance(got, dict) else f" (got {got!r})"
    return f"config key '{key}': {msg}{got_s}"


def load_config(
    config_files: Sequence[str | os.PathLike[str]] = (),
    overrides: Sequence[str] = (),
    *,
    use_base: bool = True,
) -> Config:
    """Load ``base.yaml`` + ``config_files`` + ``overrides`` into a validated :class:`Config`.

    Examples
    --------
    >>> cfg = load_config(overrides=["train.epochs=3"])
    >>> cfg.train.epochs
    3
    """
    data: Dict[str, Any] = {}
    base_dir = conf_dir()
    if use_base and base_dir is not None and (base_dir / "base.yaml").is_file():
        data = _deep_merge(data, _read_yaml(base_dir / "base.yaml"))
    for f in config_files:
        p = Path(f)
        if not p.is_file() and base_dir is not None and (base_dir / p).is_file():
            p = base_dir / p  # allow "--config gpu.yaml"
        data = _deep_merge(data, _read_yaml(p))
    for item in overrides:
        parts, value = parse_override(item)
        _apply_override(data, parts, value)
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err)) from None
