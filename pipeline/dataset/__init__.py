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

The modules, in the order one batch goes through them:

* :mod:`~pipeline.dataset.layout` -- the split's files and row groups in petastorm's
  order, with the schema, row-count and shard checks, from Parquet footers only;
* :mod:`~pipeline.dataset.reader` -- the petastorm readers of one shard, pass after pass;
* :mod:`~pipeline.dataset.tfdata` -- decode, normalise, augment and batch in ``tf.data``,
  streamed or from the decoded cache;
* :mod:`~pipeline.dataset.loaders` -- the two entry points above.

Problems are :class:`~pipeline.errors.DataError` messages that name the fix. The
ingest manifest is read by :func:`pipeline.contracts.read_manifest`.
"""
from __future__ import annotations

from typing import Sequence

from pipeline.dataset.layout import SplitLayout, split_layout
from pipeline.dataset.loaders import LoadedDataset, eval_dataset, train_dataset
from pipeline.dataset.tfdata import decoded_cache_mb

__all__: Sequence[str] = (
    "LoadedDataset", "SplitLayout", "decoded_cache_mb", "eval_dataset", "split_layout", "train_dataset",
)
