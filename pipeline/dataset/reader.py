"""The petastorm side of the loader: row-group batches of one shard, pass after pass.

:class:`ReaderSource` is the Python generator ``tf.data`` pulls from. Each pass over the
shard is one petastorm batch reader (``num_epochs=1``); training passes are reshuffled
with a seed derived from ``(seed, rank, pass)``, evaluation passes keep file order. The
row count of every pass is known from the footers (:class:`~pipeline.dataset.layout.SplitLayout`),
so a pass that ends early is waited for and a short one is an error, never a silent
loss. :meth:`ReaderSource.close` stops every reader it opened.
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
import warnings
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from pipeline.dataset.layout import LABEL_COLUMN, SplitLayout
from pipeline.errors import DataError

if TYPE_CHECKING:  # pragma: no cover
    from pipeline.config import LoaderConfig

log = logging.getLogger(__name__)

#: Columns the loader reads; everything else stays on disk.
TRAIN_COLUMNS = ("image", LABEL_COLUMN)
#: Read too when a caller asks for ids (tests, debugging).
ID_COLUMN = "image_id"


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
READER, SHUFFLE, AUGMENT = 0, 1, 2


def derived_seed(seed: int, rank: int, purpose: int, index: int = 0) -> int:
    """A reproducible, nonzero 31-bit seed (petastorm treats 0 as 'unseeded', TF wants int64)."""
    state = np.random.SeedSequence([seed & 0xFFFFFFFF, rank, purpose, index]).generate_state(1)[0]
    return int(state & 0x7FFFFFFF) or 1


class ReaderSource:
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
            kwargs.update(seed=derived_seed(self.seed, self.rank, READER, pass_index),
                          shuffle_row_groups=True, shuffle_rows=True)
        else:
            kwargs.update(seed=None, shuffle_row_groups=False, shuffle_rows=False)
        # The URL, not a pipeline.fs filesystem: petastorm 0.13.1 opens it with the legacy
        # ``pq.ParquetDataset(validate_schema=...)``, which a pyarrow.fs filesystem routes to the new
        # Dataset API, and that refuses the keyword ("'validate_schema' is not yet supported").
        return make_batch_reader(self.layout.reader_url, **kwargs)

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
        if name == LABEL_COLUMN and v.dtype.kind != "i":
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
