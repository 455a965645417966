"""The loader's two entry points: :func:`train_dataset` and :func:`eval_dataset`.

Both are context managers that check the split from its footers
(:mod:`pipeline.dataset.layout`), own the petastorm readers of this rank's shard
(:mod:`pipeline.dataset.reader`) and stop them on exit, and yield the ``tf.data``
pipeline over them (:mod:`pipeline.dataset.tfdata`) with what a trainer needs to know
about it (:class:`LoadedDataset`).
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, Iterator, Optional

from pipeline.contracts import IngestManifest, read_manifest, resolve_ingest
from pipeline.dataset.layout import SplitLayout, check_labelled, check_shards, split_layout
from pipeline.dataset.reader import ID_COLUMN, TRAIN_COLUMNS, ReaderSource
from pipeline.dataset.tfdata import build, decoded_cache_mb, empty, model_input
from pipeline.errors import DataError
from pipeline.fs import to_uri
from pipeline.imaging.stored import ImageSpec, Normalization

if TYPE_CHECKING:  # pragma: no cover
    import tensorflow as tf

    from pipeline.config import Config, LoaderConfig

log = logging.getLogger(__name__)


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
    _source: Optional[ReaderSource] = field(default=None, repr=False)

    def model_input(self, x: Any) -> Any:
        """A batch's images as the model takes them (float32, normalised; a ``pixels="uint8"``
        batch is cast and normalised): call it inside the compiled step, so that runs on the accelerator."""
        return model_input(x, self.normalization)


@dataclass(frozen=True)
class _Split:
    """One checked split of one ingest output, and how the loader reads it."""

    data_uri: str
    manifest: IngestManifest
    layout: SplitLayout
    spec: ImageSpec
    norm: Normalization
    loader: "LoaderConfig"

    def loaded(self, ds: "tf.data.Dataset", source: ReaderSource, *, rows: int, steps: Optional[int],
               rank: int, size: int, batch_size: int) -> LoadedDataset:
        return LoadedDataset(ds, rows, steps, self.layout.split, rank, size, batch_size, self.layout.num_rows,
                             self.layout.num_row_groups, self.spec, self.norm, dict(self.manifest.classes), source)


def _prepare(data_uri: str, cfg: Any, split: str, rank: int, size: int, batch_size: int) -> _Split:
    if size < 1 or not 0 <= rank < size:
        raise DataError(f"rank {rank} is not in [0, size={size}): pass Horovod's hvd.rank() and hvd.size()")
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size} (train.batch_size)")
    data_uri = to_uri(data_uri)
    loader = cfg.loader if hasattr(cfg, "loader") else cfg  # the whole config or its loader section
    root = resolve_ingest(data_uri).root  # once: every read below is of this version
    manifest = read_manifest(root)
    layout = split_layout(root, split, manifest=manifest)
    check_labelled(layout, data_uri)
    spec = ImageSpec.from_manifest(manifest)
    norm = Normalization.from_mode(loader.normalize, manifest, spec.channels)
    return _Split(data_uri, manifest, layout, spec, norm, loader)


@contextlib.contextmanager
def train_dataset(data_uri: str, cfg: "Config", *, rank: int, size: int, batch_size: int, seed: int,
                  split: str = "train", with_ids: bool = False, pixels: str = "float32") -> Iterator[LoadedDataset]:
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
    pixels:
        ``float32``: normalised images. ``uint8``: the decoded, augmented pixels (padding with the
        rounded channel mean), a quarter of the bytes; the trainer's compiled step turns them into
        the model's input with ``.model_input(x)``, on the GPU when there is one.

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
    s = _prepare(data_uri, cfg, split, rank, size, batch_size)
    layout, loader = s.layout, s.loader
    check_shards(layout, size, s.data_uri)
    columns = TRAIN_COLUMNS + ((ID_COLUMN,) if with_ids else ())
    steps = max(1, layout.num_rows // (size * batch_size))
    shard_rows = layout.shard_rows(rank, size)
    cache_mb = decoded_cache_mb(shard_rows, s.spec, with_ids)
    cached = 0 < cache_mb <= loader.cache_max_mb
    source = ReaderSource(layout, loader, columns=columns, shard=rank, shard_count=size, train=True,
                          seed=seed, rank=rank, passes=1 if cached else None)
    try:
        ds = build(source, spec=s.spec, norm=s.norm, loader=loader, batch_size=batch_size, train=True,
                   seed=seed, rank=rank, cached=cached, pixels=pixels)
        log.info(
            "train data %s split=%s: %d rows in %d row groups; rank %d/%d reads %d row groups (%d rows); "
            "batch %d, %d steps per epoch; reader %s x%d, queue %d row groups; %s",
            s.data_uri, split, layout.num_rows, layout.num_row_groups, rank, size,
            layout.shard_row_groups(rank, size), shard_rows, batch_size, steps,
            loader.reader_pool_type, loader.workers_count, loader.results_queue_size,
            f"decoded shard cached in memory ({cache_mb:.1f} MiB)" if cached else
            f"streaming every pass (decoded shard {cache_mb:.1f} MiB > loader.cache_max_mb={loader.cache_max_mb})",
        )
        yield s.loaded(ds, source, rows=shard_rows, steps=steps, rank=rank, size=size, batch_size=batch_size)
    finally:
        source.close()


@contextlib.contextmanager
def eval_dataset(data_uri: str, cfg: "Config", *, split: str, rank: int, size: int, batch_size: int,
                 with_ids: bool = False, pixels: str = "float32") -> Iterator[LoadedDataset]:
    """A finite dataset in which every row of ``split`` is seen exactly once over all ranks together.

    Row group ``i`` (files sorted by path, then row groups in file order) belongs to rank
    ``i % min(size, row_groups)``; ranks beyond the number of row groups get an empty dataset.
    No shuffle, no augmentation, no repeat; the last batch may be partial. Ranks may get
    different batch counts: aggregate metrics with one allreduce of totals after the loop.
    Each iteration of ``.dataset`` opens a fresh reader, so it can be evaluated every epoch.

    ``with_ids`` adds the ``image_id`` column: ``(image, label, image_id)``; ``pixels`` as in
    :func:`train_dataset`.
    """
    s = _prepare(data_uri, cfg, split, rank, size, batch_size)
    layout = s.layout
    shard_count = min(size, layout.num_row_groups)
    columns = TRAIN_COLUMNS + ((ID_COLUMN,) if with_ids else ())
    source = ReaderSource(layout, s.loader, columns=columns, shard=rank, shard_count=shard_count, train=False)
    try:
        if rank < shard_count:
            rows = layout.shard_rows(rank, shard_count)
            ds = build(source, spec=s.spec, norm=s.norm, loader=s.loader, batch_size=batch_size, train=False,
                       seed=0, rank=rank, pixels=pixels)
        else:
            rows = 0
            ds = empty(s.spec, columns, pixels)
        log.info("eval data %s split=%s: %d rows in %d row groups; rank %d/%d sees %d rows",
                 s.data_uri, split, layout.num_rows, layout.num_row_groups, rank, size, rows)
        yield s.loaded(ds, source, rows=rows, steps=None, rank=rank, size=size, batch_size=batch_size)
    finally:
        source.close()
