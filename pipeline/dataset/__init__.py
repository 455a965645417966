"""Petastorm readers over the ingested Parquet, as sharded ``tf.data`` pipelines.

The bridge between ingest's output (``<data>/images/split=<s>/part-*.parquet``,
see ``docs/contracts.md``) and TensorFlow. Two entry points, both context
managers that own their petastorm readers and stop them on exit:

* :func:`train_dataset` -- an *infinite* dataset of ``(image, label)`` batches
  for one Horovod rank, plus ``steps_per_epoch``, identical on every rank.
  Each process reads only its own row groups (petastorm ``cur_shard`` /
  ``shard_count``: row group ``i`` of the split, in file order, goes to rank
  ``i % size``). Every pass over the shard is a fresh reader whose seed is
  derived from ``(seed, rank, pass)``, so row-group order and row order differ
  from pass to pass and are reproducible. Because the stream never ends and
  every rank runs exactly ``steps_per_epoch`` steps, uneven row groups can
  never leave one rank waiting in an allreduce for another that ran dry.
* :func:`eval_dataset` -- a *finite* dataset in which every row of the split
  is seen exactly once over all ranks together: each row group belongs to
  exactly one rank, nothing is shuffled, dropped or repeated, and the last
  batch may be partial. Ranks may get different batch counts, so metrics must
  be aggregated with one allreduce of totals after the loop.

Decoding (with the decompression-bomb header check) and normalisation are
:mod:`pipeline.preprocess`, shared with scoring. The layout, schema and row
counts are checked from Parquet footers before any reader starts, and problems
are :class:`~pipeline.errors.DataError` messages that name the fix.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import logging
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from pipeline import storage
from pipeline.errors import DataError
from pipeline.preprocess import ImageSpec, Normalization, tf_decode, tf_normalize
from pipeline.schema import IMAGE_FIELDS, SPLIT_COLUMN, UNLABELED_SPLIT

if TYPE_CHECKING:  # pragma: no cover
    import tensorflow as tf

    from pipeline.config import Config, LoaderConfig

log = logging.getLogger(__name__)

MANIFEST_NAME = "_manifest.json"
IMAGES_DIR = "images"
#: Columns the loader reads; everything else stays on disk.
_TRAIN_COLUMNS = ("image", "label_index")
_ID_COLUMN = "image_id"
#: Arrow type names each Spark SQL type of :data:`pipeline.schema.IMAGE_FIELDS` may be stored as.
_ARROW_TYPES = {
    "string": ("string", "large_string"),
    "binary": ("binary", "large_binary"),
    "int": ("int32",),
}


# --- manifest and layout --------------------------------------------------------

def _filesystem(uri: str) -> Tuple[Any, str]:
    """The (legacy pyarrow) filesystem petastorm itself uses for ``uri``, and the path in it."""
    from petastorm.fs_utils import get_filesystem_and_path_or_paths

    _quiet_petastorm()
    return get_filesystem_and_path_or_paths(uri)


def read_manifest(data_uri: str) -> Dict[str, Any]:
    """The ``_manifest.json`` of a committed ingest output (no Spark needed).

    Raises :class:`DataError` when ``data_uri`` is not a committed ingest output.
    """
    data_uri = storage.to_uri(data_uri)
    fs, root = _filesystem(data_uri)
    if not fs.exists(root):
        raise DataError(f"ingest output {data_uri} does not exist: run ingest first, or pass the ingest --output URI")
    if not fs.exists(f"{root.rstrip('/')}/{storage.COMMIT_MARKER}"):
        raise DataError(
            f"{data_uri} is not a committed ingest output (no {storage.COMMIT_MARKER}): "
            "re-run ingest (a crashed or running ingest leaves no marker)"
        )
    path = f"{root.rstrip('/')}/{MANIFEST_NAME}"
    if not fs.exists(path):
        raise DataError(f"{data_uri} has no {MANIFEST_NAME}: it was not written by pixelmill ingest (re-run ingest)")
    with fs.open(path, "rb") as f:
        try:
            manifest = json.loads(f.read().decode("utf-8"))
        except ValueError as e:
            raise DataError(f"{data_uri}/{MANIFEST_NAME} is not valid JSON ({e}): re-run ingest") from None
    for key in ("splits", "image"):
        if key not in manifest:
            raise DataError(f"{data_uri}/{MANIFEST_NAME} has no '{key}': it was written by another tool (re-run ingest)")
    return manifest


@dataclass(frozen=True)
class SplitLayout:
    """Files and row groups of one split, in the order petastorm shards them."""

    split: str
    uri: str
    files: Tuple[str, ...]
    #: Rows of every row group, in petastorm's order (files sorted by path, then row groups).
    row_group_rows: Tuple[int, ...]
    #: Rows whose ``label_index`` is null, from the footers' statistics (None = no statistics).
    null_labels: Optional[int] = None

    @property
    def num_rows(self) -> int:
        return int(sum(self.row_group_rows))

    @property
    def num_row_groups(self) -> int:
        return len(self.row_group_rows)

    def shard_rows(self, shard: int, shard_count: int) -> int:
        """Rows petastorm gives shard ``shard`` of ``shard_count`` (row group ``i`` -> shard ``i % shard_count``)."""
        return int(sum(n for i, n in enumerate(self.row_group_rows) if i % shard_count == shard))

    def shard_row_groups(self, shard: int, shard_count: int) -> int:
        return len(range(shard, self.num_row_groups, shard_count))


def _check_schema(schema: Any, where: str) -> None:
    """Raise DataError unless ``schema`` (pyarrow) holds every ingest column with its ingest type."""
    names = set(schema.names)
    problems: List[str] = []
    for f in IMAGE_FIELDS:
        if f.name == SPLIT_COLUMN:  # the hive partition folder, not a column in the files
            continue
        if f.name not in names:
            problems.append(f"missing column '{f.name}'")
            continue
        got = str(schema.field(f.name).type)
        if got not in _ARROW_TYPES[f.spark_type]:
            problems.append(f"column '{f.name}' is {got}, expected {f.spark_type}")
    if problems:
        raise DataError(
            f"{where} does not have the ingest schema ({'; '.join(problems)}): "
            "point the loader at a pixelmill ingest output, or re-run ingest"
        )


def split_layout(data_uri: str, split: str, manifest: Optional[Mapping[str, Any]] = None) -> SplitLayout:
    """Read the footers of ``<data_uri>/images/split=<split>/`` and check them against the ingest schema.

    Only footers are read (a few KB per file), in parallel threads.
    """
    import pyarrow.parquet as pq

    data_uri = storage.to_uri(data_uri)
    manifest = manifest if manifest is not None else read_manifest(data_uri)
    uri = storage.join(data_uri, IMAGES_DIR, f"{SPLIT_COLUMN}={split}")
    known = sorted(k for k, v in (manifest.get("splits") or {}).items() if v)
    fs, path = _filesystem(uri)
    if not fs.exists(path):
        raise DataError(
            f"split '{split}' not found in {data_uri} (no images/{SPLIT_COLUMN}={split}/; "
            f"this output has: {', '.join(known) or 'no splits'}): pick one of those, "
            "or re-run ingest with ingest.split_fractions giving it a share"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        dataset = pq.ParquetDataset(path, filesystem=fs, validate_schema=False)
        pieces = list(dataset.pieces)
    if not pieces:
        raise DataError(f"split '{split}' of {data_uri} holds no Parquet files: re-run ingest")

    def footer(piece: Any) -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return piece.get_metadata()

    with ThreadPoolExecutor(max_workers=min(16, len(pieces))) as pool:
        metas = list(pool.map(footer, pieces))
    rows: List[int] = []
    nulls: Optional[int] = 0
    for piece, meta in zip(pieces, metas):
        _check_schema(meta.schema.to_arrow_schema(), storage.join(uri, piece.path.rsplit("/", 1)[-1]))
        col = meta.schema.to_arrow_schema().get_field_index("label_index")
        for g in range(meta.num_row_groups):
            rg = meta.row_group(g)
            rows.append(int(rg.num_rows))
            stats = rg.column(col).statistics if col >= 0 else None
            if nulls is not None and stats is not None and stats.has_null_count:
                nulls += int(stats.null_count)
            else:
                nulls = None
    layout = SplitLayout(split, uri, tuple(p.path for p in pieces), tuple(rows), nulls)
    expected = (manifest.get("splits") or {}).get(split)
    if expected is not None and int(expected) != layout.num_rows:
        raise DataError(
            f"split '{split}' of {data_uri} holds {layout.num_rows} rows but the manifest says {expected}: "
            "the output was modified after ingest committed it (re-run ingest)"
        )
    return layout


def _check_shards(layout: SplitLayout, size: int, data_uri: str) -> None:
    if layout.num_row_groups < size:
        raise DataError(
            f"split '{layout.split}' of {data_uri} has {layout.num_row_groups} Parquet row groups but {size} "
            f"training processes each need at least one: set ingest.max_train_procs >= {size} and re-run ingest "
            f"(or train with train.num_proc <= {layout.num_row_groups})"
        )


def _check_labelled(layout: SplitLayout, data_uri: str) -> None:
    if layout.split == UNLABELED_SPLIT or (layout.null_labels or 0) > 0:
        raise DataError(
            f"split '{layout.split}' of {data_uri} has rows without labels "
            f"({layout.null_labels if layout.null_labels else 'all'}): train and evaluate on labelled splits "
            "(train/val/test), or re-run ingest with labels (ingest.label_source)"
        )


# --- petastorm readers ------------------------------------------------------------

def _quiet_petastorm() -> None:
    """Silence pyarrow's legacy-API FutureWarnings raised inside petastorm (its pinned design, not ours).

    Re-applied on every call: ``warnings`` de-duplicates the filter, and test runners reset filters per test.
    """
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"petastorm(\.|$)")
    # We pass exact column names; this warns about regexes that used to match by prefix.
    warnings.filterwarnings("ignore", message="schema_fields behavior has changed", category=UserWarning)


#: How long an early end of a petastorm pass is retried before the pass counts as short.
_EARLY_END_GRACE_S = 10.0
#: What a derived seed is for: a reader pass, the tf.data shuffle buffer, augmentation.
_READER, _SHUFFLE, _AUGMENT = 0, 1, 2


def _derived_seed(seed: int, rank: int, purpose: int, index: int = 0) -> int:
    """A reproducible, nonzero 31-bit seed (petastorm treats 0 as 'unseeded', TF wants int64)."""
    state = np.random.SeedSequence([seed & 0xFFFFFFFF, rank, purpose, index]).generate_state(1)[0]
    return int(state & 0x7FFFFFFF) or 1


class _ReaderSource:
    """Python generator of row-group batches from petastorm readers; closes every reader it opened."""

    def __init__(self, layout: SplitLayout, loader: "LoaderConfig", *, columns: Sequence[str],
                 shard: int, shard_count: int, train: bool, seed: int = 0, rank: int = 0,
                 passes: Optional[int] = None) -> None:
        self.layout = layout
        self.loader = loader
        self.columns = tuple(columns)
        self.shard, self.shard_count = shard, shard_count
        self.train, self.seed, self.rank = train, seed, rank
        #: Passes over the shard: None = endless (train), 1 = once (eval, or train feeding the decoded cache).
        self.passes = passes if passes is not None else (None if train else 1)
        self._open: List[Any] = []
        self._lock = threading.Lock()
        self._closed = False
        self.passes_started = 0

    def _make_reader(self, pass_index: int) -> Any:
        from petastorm import make_batch_reader

        _quiet_petastorm()
        kwargs: Dict[str, Any] = dict(
            schema_fields=list(self.columns),
            reader_pool_type=self.loader.reader_pool_type,
            workers_count=self.loader.workers_count,
            results_queue_size=self.loader.results_queue_size,
            num_epochs=1,
            cur_shard=self.shard,
            shard_count=self.shard_count,
        )
        if self.train:
            kwargs.update(seed=_derived_seed(self.seed, self.rank, _READER, pass_index), shuffle_row_groups=True, shuffle_rows=True)
        else:
            kwargs.update(seed=None, shuffle_row_groups=False, shuffle_rows=False)
        return make_batch_reader(self.layout.uri, **kwargs)

    def __call__(self) -> Iterator[Tuple[np.ndarray, ...]]:
        passes = itertools.count() if self.passes is None else iter(range(self.passes))
        for pass_index in passes:
            with self._lock:
                if self._closed:
                    return
                reader = self._make_reader(pass_index)
                self._open.append(reader)
                self.passes_started += 1
            expected = self.layout.shard_rows(self.shard, self.shard_count)
            try:
                rows = yield from self._read_pass(reader, expected)
            finally:
                self._stop(reader)
            if self._closed:
                return
            if rows != expected:
                raise DataError(
                    f"rank {self.rank} read {rows} rows of split '{self.layout.split}' in one pass, expected "
                    f"{expected} from the Parquet footers: the data changed while reading (re-run ingest)"
                )
            log.debug("split %s shard %d/%d: pass %d read %d rows", self.layout.split, self.shard,
                      self.shard_count, pass_index, rows)

    def _read_pass(self, reader: Any, expected: int) -> Iterator[Tuple[np.ndarray, ...]]:
        """Yield one reader's batches; returns the number of rows read.

        petastorm's worker pools can report the end of a pass before their ventilator has handed
        out the last row groups (they check "all handed-out work is done" before "the ventilator has
        finished", and the ventilator can finish in between). Seen here on about 6% of readers: a
        pass silently returned no rows. We know how many rows a pass holds, so an early end is
        retried until those rows arrive; a pass that really is short is an error, never a silent loss.
        """
        rows = 0
        deadline: Optional[float] = None
        while True:
            try:
                batch = next(reader)
            except StopIteration:
                if rows >= expected or self._closed:  # closed: the consumer is gone, do not wait out the grace
                    return rows
                now = time.monotonic()
                deadline = deadline or now + _EARLY_END_GRACE_S
                if now > deadline:
                    return rows
                time.sleep(0.005)
                continue
            deadline = None
            out = tuple(self._column(batch, c) for c in self.columns)
            rows += len(out[0])
            yield out

    def _column(self, batch: Any, name: str) -> np.ndarray:
        v = np.asarray(getattr(batch, name))
        if name == "label_index" and v.dtype.kind != "i":
            if v.dtype.kind == "f" and np.isnan(v).any():
                raise DataError(f"split '{self.layout.split}' has rows without label_index: re-run ingest")
            v = v.astype(np.int32)
        return v

    def _stop(self, reader: Any) -> None:
        with self._lock:
            if reader in self._open:
                self._open.remove(reader)
            else:
                return
        reader.stop()
        reader.join()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            readers, self._open = list(self._open), []
        for r in readers:
            try:
                r.stop()
                r.join()
            except Exception:  # pragma: no cover - best effort on shutdown
                log.warning("could not stop a petastorm reader cleanly", exc_info=True)


# --- tf.data ---------------------------------------------------------------------------

@dataclass
class LoadedDataset:
    """What :func:`train_dataset` / :func:`eval_dataset` yield."""

    dataset: "tf.data.Dataset"
    #: Rows this rank reads per pass (eval: exactly the rows this rank sees).
    num_rows: int
    #: Training steps per epoch, identical on every rank (None for eval).
    steps_per_epoch: Optional[int]
    split: str
    rank: int
    size: int
    batch_size: int
    #: Rows of the whole split (all ranks).
    split_rows: int
    row_groups: int
    image: ImageSpec
    normalization: Normalization
    classes: Dict[str, int] = field(default_factory=dict)
    _source: Optional[_ReaderSource] = field(default=None, repr=False)


def _loader_section(cfg: Any) -> "LoaderConfig":
    return cfg.loader if hasattr(cfg, "loader") else cfg


def _signature(columns: Sequence[str]) -> Tuple[Any, ...]:
    import tensorflow as tf

    types = {"image": tf.string, "label_index": tf.int32, _ID_COLUMN: tf.string}
    return tuple(tf.TensorSpec([None], types[c]) for c in columns)


def _augment(x: Any, seed: Any, loader: "LoaderConfig", spec: ImageSpec) -> Any:
    """Random flip / pad-and-crop with stateless ops keyed by the element's seed (reproducible)."""
    import tensorflow as tf

    aug = loader.augment
    if aug.flip_left_right:
        x = tf.image.stateless_random_flip_left_right(x, seed=seed)
    if aug.crop_pad > 0:
        p = aug.crop_pad
        # Zero padding after normalisation pads with the channel mean.
        x = tf.pad(x, [[p, p], [p, p], [0, 0]])
        x = tf.image.stateless_random_crop(x, size=spec.shape, seed=seed[::-1] + 1)
    return x


def _augment_batch(x: Any, seed: Any, loader: "LoaderConfig", spec: ImageSpec) -> Any:
    """:func:`_augment` for a whole batch ``(b, h, w, c)``: an independent draw per image."""
    import tensorflow as tf

    aug = loader.augment
    n = tf.shape(x)[0]
    if aug.flip_left_right:
        flip = tf.random.stateless_uniform([n], seed=seed) < 0.5
        x = tf.where(flip[:, None, None, None], tf.reverse(x, axis=[2]), x)
    if aug.crop_pad > 0:
        p = aug.crop_pad
        x = tf.pad(x, [[0, 0], [p, p], [p, p], [0, 0]])
        seeds = tf.random.stateless_uniform([n, 2], seed=seed[::-1] + 1, minval=None, maxval=None, dtype=tf.int64)
        x = tf.map_fn(lambda a: tf.image.stateless_random_crop(a[0], size=spec.shape, seed=a[1]), (x, seeds),
                      fn_output_signature=tf.TensorSpec(spec.shape, x.dtype))
    return x


def _cached_stream(ds: "tf.data.Dataset", source: _ReaderSource, *, spec: ImageSpec, norm: Normalization,
                   loader: "LoaderConfig", batch_size: int, seed: int, rank: int) -> "tf.data.Dataset":
    """The training stream over the decoded cache (``ds``: one pass of encoded rows, already
    mixed by the shuffle buffer, so the first batch waits for bytes, not decoded images).

    The first pass is read from Parquet and decoded as it trains, keeping ``uint8`` pixels;
    every later pass is a fresh in-memory shuffle of the whole shard. Only the decode is
    per image: normalisation and augmentation run once per batch, vectorised.
    """
    import tensorflow as tf

    def decode_u8(*row: Any) -> Tuple[Any, ...]:
        return (tf.cast(tf_decode(row[0], spec), tf.uint8),) + row[1:]

    pixels = ds.map(decode_u8, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).cache()
    later = pixels.shuffle(max(1, source.layout.shard_rows(source.shard, source.shard_count)),
                           seed=_derived_seed(seed, rank, _SHUFFLE, 1), reshuffle_each_iteration=True)
    base = tf.constant(_derived_seed(seed, rank, _AUGMENT), tf.int64)
    augmenting = loader.augment.flip_left_right or loader.augment.crop_pad > 0

    def batch_map(i: Any, batch: Tuple[Any, ...]) -> Tuple[Any, ...]:
        x = tf_normalize(tf.cast(batch[0], tf.float32), norm)
        if augmenting:
            x = _augment_batch(x, tf.stack([base, i]), loader, spec)
        return (x,) + tuple(batch[1:])

    out = pixels.concatenate(later.repeat()).batch(batch_size, drop_remainder=True).enumerate()
    out = out.map(batch_map, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return out.prefetch(tf.data.AUTOTUNE if loader.prefetch < 0 else loader.prefetch)


def _build(source: _ReaderSource, *, spec: ImageSpec, norm: Normalization, loader: "LoaderConfig",
           batch_size: int, train: bool, seed: int, rank: int, with_ids: bool,
           cached: bool = False) -> "tf.data.Dataset":
    import tensorflow as tf

    ds = tf.data.Dataset.from_generator(source, output_signature=_signature(source.columns))
    ds = ds.unbatch()
    if train and loader.shuffle_buffer > 1:
        # Mixes rows across row groups; holds encoded bytes, not decoded pixels.
        ds = ds.shuffle(loader.shuffle_buffer, seed=_derived_seed(seed, rank, _SHUFFLE),
                        reshuffle_each_iteration=False)
    if cached:
        return _cached_stream(ds, source, spec=spec, norm=norm, loader=loader, batch_size=batch_size,
                              seed=seed, rank=rank)

    def decode(image: Any) -> Any:
        return tf_normalize(tf_decode(image, spec), norm)

    if train:
        base = tf.constant(_derived_seed(seed, rank, _AUGMENT), tf.int64)
        augmenting = loader.augment.flip_left_right or loader.augment.crop_pad > 0

        def train_map(i: Any, row: Tuple[Any, ...]) -> Tuple[Any, ...]:
            x = decode(row[0])
            if augmenting:
                x = _augment(x, tf.stack([base, i]), loader, spec)
            return (x, row[1]) + ((row[2],) if with_ids else ())

        ds = ds.enumerate().map(train_map, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        ds = ds.batch(batch_size, drop_remainder=True)
    else:
        def eval_map(*row: Any) -> Tuple[Any, ...]:
            return (decode(row[0]), row[1]) + ((row[2],) if with_ids else ())

        ds = ds.map(eval_map, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        ds = ds.batch(batch_size, drop_remainder=False)
    return ds.prefetch(tf.data.AUTOTUNE if loader.prefetch < 0 else loader.prefetch)


def decoded_cache_mb(rows: int, spec: ImageSpec, with_ids: bool = False) -> float:
    """MiB one rank's decoded cache holds: uint8 pixels, the label and (optionally) the image id."""
    per_row = spec.height * spec.width * spec.channels + 8 + (96 if with_ids else 0)
    return rows * per_row / 2**20


def _prepare(data_uri: str, cfg: Any, split: str, rank: int, size: int, batch_size: int) -> Tuple[
        str, Dict[str, Any], SplitLayout, ImageSpec, Normalization, "LoaderConfig"]:
    if size < 1 or not 0 <= rank < size:
        raise DataError(f"rank {rank} is not in [0, size={size}): pass Horovod's hvd.rank() and hvd.size()")
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size} (train.batch_size)")
    data_uri = storage.to_uri(data_uri)
    loader = _loader_section(cfg)
    manifest = read_manifest(data_uri)
    layout = split_layout(data_uri, split, manifest)
    _check_labelled(layout, data_uri)
    spec = ImageSpec.from_manifest(manifest)
    norm = Normalization.from_mode(loader.normalize, manifest, spec.channels)
    return data_uri, manifest, layout, spec, norm, loader


@contextlib.contextmanager
def train_dataset(data_uri: str, cfg: "Config", *, rank: int, size: int, batch_size: int, seed: int,
                  split: str = "train", with_ids: bool = False) -> Iterator[LoadedDataset]:
    """An infinite, sharded, shuffled, augmented dataset of ``(image, label)`` batches for one rank.

    Parameters
    ----------
    data_uri:
        The ingest output (the folder holding ``_manifest.json``).
    cfg:
        The pixelmill config (its ``loader`` section is used).
    rank, size:
        This process's Horovod rank and the number of processes.
    batch_size:
        Per-process batch size.
    seed:
        Base seed; each pass over the shard reshuffles with a seed derived from ``(seed, rank, pass)``.
    with_ids:
        Also yield the ``image_id`` of every row (``(image, label, image_id)``), for tests and debugging.

    Yields
    ------
    LoadedDataset
        ``.dataset`` never ends: run exactly ``.steps_per_epoch`` steps per epoch on every rank,
        ``floor(rows_in_split / (size * batch_size))`` (at least 1). Readers stop when the block exits.

    Examples
    --------
    >>> with train_dataset(uri, cfg, rank=hvd.rank(), size=hvd.size(), batch_size=64, seed=42) as data:
    ...     it = iter(data.dataset)
    ...     for step in range(data.steps_per_epoch):
    ...         images, labels = next(it)
    """
    data_uri, manifest, layout, spec, norm, loader = _prepare(data_uri, cfg, split, rank, size, batch_size)
    _check_shards(layout, size, data_uri)
    columns = _TRAIN_COLUMNS + ((_ID_COLUMN,) if with_ids else ())
    steps = max(1, layout.num_rows // (size * batch_size))
    shard_rows = layout.shard_rows(rank, size)
    cache_mb = decoded_cache_mb(shard_rows, spec, with_ids)
    cached = 0 < cache_mb <= loader.cache_max_mb
    source = _ReaderSource(layout, loader, columns=columns, shard=rank, shard_count=size, train=True,
                           seed=seed, rank=rank, passes=1 if cached else None)
    try:
        ds = _build(source, spec=spec, norm=norm, loader=loader, batch_size=batch_size, train=True,
                    seed=seed, rank=rank, with_ids=with_ids, cached=cached)
        log.info(
            "train data %s split=%s: %d rows in %d row groups; rank %d/%d reads %d row groups (%d rows); "
            "batch %d, %d steps per epoch; reader %s x%d, queue %d row groups; %s",
            data_uri, split, layout.num_rows, layout.num_row_groups, rank, size,
            layout.shard_row_groups(rank, size), shard_rows, batch_size, steps,
            loader.reader_pool_type, loader.workers_count, loader.results_queue_size,
            f"decoded shard cached in memory ({cache_mb:.1f} MiB)" if cached else
            f"streaming every pass (decoded shard {cache_mb:.1f} MiB > loader.cache_max_mb={loader.cache_max_mb})",
        )
        yield LoadedDataset(ds, shard_rows, steps, split, rank, size, batch_size, layout.num_rows,
                            layout.num_row_groups, spec, norm, dict(manifest.get("classes") or {}), source)
    finally:
        source.close()


@contextlib.contextmanager
def eval_dataset(data_uri: str, cfg: "Config", *, split: str, rank: int, size: int, batch_size: int,
                 with_ids: bool = False) -> Iterator[LoadedDataset]:
    """A finite dataset in which every row of ``split`` is seen exactly once over all ranks together.

    Row group ``i`` (files sorted by path, then row groups in file order) belongs to rank
    ``i % min(size, row_groups)``; ranks beyond the number of row groups get an empty dataset.
    No shuffle, no augmentation, no repeat; the last batch may be partial. Ranks may get
    different batch counts: aggregate metrics with one allreduce of totals after the loop.
    Each iteration of ``.dataset`` opens a fresh reader, so it can be evaluated every epoch.

    ``with_ids`` adds the ``image_id`` column: ``(image, label, image_id)``.
    """
    data_uri, manifest, layout, spec, norm, loader = _prepare(data_uri, cfg, split, rank, size, batch_size)
    shard_count = min(size, layout.num_row_groups)
    columns = _TRAIN_COLUMNS + ((_ID_COLUMN,) if with_ids else ())
    source = _ReaderSource(layout, loader, columns=columns, shard=rank, shard_count=shard_count, train=False)
    try:
        if rank < shard_count:
            rows = layout.shard_rows(rank, shard_count)
            ds = _build(source, spec=spec, norm=norm, loader=loader, batch_size=batch_size, train=False,
                        seed=0, rank=rank, with_ids=with_ids)
        else:
            rows = 0
            ds = _empty(spec, columns)
        log.info("eval data %s split=%s: %d rows in %d row groups; rank %d/%d sees %d rows",
                 data_uri, split, layout.num_rows, layout.num_row_groups, rank, size, rows)
        yield LoadedDataset(ds, rows, None, split, rank, size, batch_size, layout.num_rows,
                            layout.num_row_groups, spec, norm, dict(manifest.get("classes") or {}), source)
    finally:
        source.close()


def _empty(spec: ImageSpec, columns: Sequence[str]) -> "tf.data.Dataset":
    import tensorflow as tf

    parts: List[Any] = [tf.zeros((0,) + spec.shape, tf.float32), tf.zeros((0,), tf.int32)]
    if _ID_COLUMN in columns:
        parts.append(tf.zeros((0,), tf.string))
    return tf.data.Dataset.from_tensors(tuple(parts)).take(0)


def describe(data: LoadedDataset) -> Dict[str, Any]:
    """A JSON-able summary for logs and ``model.json``."""
    return {
        "split": data.split, "rank": data.rank, "size": data.size, "batch_size": data.batch_size,
        "rows": data.num_rows, "split_rows": data.split_rows, "row_groups": data.row_groups,
        "steps_per_epoch": data.steps_per_epoch, "image": list(data.image.shape),
        "normalization": data.normalization.to_dict(),
    }


__all__: Sequence[str] = (
    "LoadedDataset", "SplitLayout", "describe", "eval_dataset", "read_manifest", "split_layout", "train_dataset",
)
