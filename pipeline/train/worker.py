"""What runs inside each Horovod process launched by :mod:`pipeline.train.driver`.

:func:`train_fn` receives plain data (a dict: URIs, the config as a dict, the ingest
manifest's hash, the armed fault plan), never the SparkSession. It:

1. sets TensorFlow threading, pins the GPU Spark assigned to the task
   (:mod:`pipeline.train.gpu`), and enables mixed precision when configured;
2. builds the model (:mod:`pipeline.train.models`) from the ingest manifest;
3. rank 0 restores the last complete checkpoint (weights, optimizer state, epoch,
   early-stopping state, history) or, on a fresh start, loads ``train.init_weights``
   (:mod:`pipeline.train.init_weights`), and broadcasts everything;
4. trains data-parallel with ``hvd.DistributedGradientTape`` (Keras 3 with
   ``horovod.tensorflow``; ``horovod.tensorflow.keras`` is broken on Keras 3), the learning
   rate from :mod:`pipeline.train.schedule`, a fixed number of steps per epoch on every
   rank (the dataset layer guarantees it);
5. averages metrics (one allreduce of totals per epoch) and BatchNorm statistics across
   ranks, validates on the val split exactly once per epoch, applies early stopping;
6. rank 0 writes the epoch's checkpoint and outputs, and finally the exported model and
   its card (:mod:`pipeline.train.outputs`), and beats the progress file the driver's
   watchdog reads (:mod:`pipeline.train.progress`).
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional, Tuple

from pipeline import faults, tracking
from pipeline.contracts import CHECKPOINTS_DIR, read_manifest
from pipeline.fs import filesystem, join
from pipeline.train import checkpoints, outputs
from pipeline.train.progress import Heartbeat
from pipeline.train.finetune import Schedule
from pipeline.train.schedule import EarlyStopping, learning_rate_schedule
from pipeline.train.steps import TrainStep
from pipeline.train.steps import eval_step as make_eval_step

if TYPE_CHECKING:  # pragma: no cover
    from pipeline.config import Config, TrainConfig
    from pipeline.train.finetune import Split
    from pipeline.train.gpu import GpuChoice
    from pipeline.train.steps import Optimizers

log = logging.getLogger(__name__)


def train_fn(spec: Dict[str, Any]) -> Dict[str, Any]:
    """Entry point of each Horovod process (shipped by ``horovod.spark.run``).

    ``spec`` keys: ``run_id``, ``data_uri``, ``model_dir``, ``cfg`` (``Config.model_dump``),
    ``manifest_sha256``, ``fingerprint``, ``fault`` (a :class:`pipeline.faults.FaultPlan` or
    None), ``num_proc``, ``class_weights`` (loss weight per class index, or None). Returns this rank's result; rank 0's includes the training summary.
    """
    from pipeline.config import Config

    from pipeline.train.models import for_model

    cfg = for_model(Config.model_validate(spec["cfg"]))
    _setup_logging(int(os.environ.get("HOROVOD_RANK", "0")), cfg.train.verbose)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    if cfg.train.intra_op_threads:
        tf.config.threading.set_intra_op_parallelism_threads(cfg.train.intra_op_threads)
    if cfg.train.inter_op_threads:
        tf.config.threading.set_inter_op_parallelism_threads(cfg.train.inter_op_threads)

    import horovod.tensorflow as hvd

    hvd.init()
    try:
        return _Worker(spec, cfg, hvd).run()
    except Exception as e:
        if _is_peer_loss(e):
            # horovod.spark.run names the first process to exit, polled once a second. A rank that only
            # saw a peer vanish waits so the rank that actually failed (killed, OOM, raised) exits first
            # and is the one the driver's one-line error names.
            log.warning("a Horovod peer failed (%s): exiting after %.0f s", type(e).__name__, PEER_LOSS_GRACE_S)
            time.sleep(PEER_LOSS_GRACE_S)
        raise
    finally:
        sys.stderr.flush()


# Longer than two of horovod.spark's one-second exit-code polls.
PEER_LOSS_GRACE_S = 3.0
_PEER_LOSS = re.compile(r"gloo|connection (closed|reset)|broken pipe|horovod (has been )?shut ?down|peer", re.I)


def _is_peer_loss(err: BaseException) -> bool:
    """Whether ``err`` is a collective failing because another rank went away (not this rank's own fault)."""
    try:
        from horovod.common.exceptions import HorovodInternalError
    except ImportError:  # pragma: no cover
        HorovodInternalError = ()  # type: ignore[assignment,misc]
    if isinstance(err, HorovodInternalError):
        return True
    import tensorflow as tf

    return isinstance(err, tf.errors.OpError) and bool(_PEER_LOSS.search(str(err)))


def _setup_logging(rank: int, verbose: int) -> None:
    root = logging.getLogger("pipeline")
    if not any(getattr(h, "_pixelmill", False) for h in root.handlers):
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter(f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s"))
        h._pixelmill = True  # type: ignore[attr-defined]
        root.addHandler(h)
        root.propagate = False
    root.setLevel(logging.INFO if rank == 0 and verbose > 0 else logging.WARNING)


def _pin_devices(tc: "TrainConfig", local_rank: int) -> Tuple["GpuChoice", bool]:
    """Pin the GPU Spark assigned to this task; returns it and whether mixed precision is on."""
    import tensorflow as tf

    from pipeline.train.gpu import pin_gpu, select_gpu

    try:
        from horovod.spark.task import get_available_devices

        assigned = list(get_available_devices())
    except Exception:  # noqa: BLE001 - not under horovod.spark (e.g. horovodrun)
        assigned = []
    choice = select_gpu(assigned, local_rank=local_rank, num_visible=len(tf.config.list_physical_devices("GPU")),
                        cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"))
    pin_gpu(choice)
    mixed = bool(tc.mixed_precision and choice.index is not None)
    if tc.mixed_precision and not mixed:
        log.warning("train.mixed_precision is set but this process has no GPU: training in float32")
    if mixed:
        import keras

        keras.mixed_precision.set_global_policy("mixed_float16")
    return choice, mixed


def _build(tc: "TrainConfig", image_shape: Tuple[int, int, int], num_classes: int,
           mixed: bool) -> Tuple[Any, Optional["Split"], "Optimizers"]:
    """The model, its head/backbone split under a fine-tuning schedule, and its built optimizer(s)."""
    from pipeline.train.finetune import Schedule, Split
    from pipeline.train.models import build_model
    from pipeline.train.steps import build_optimizers

    model = build_model(tc.model, image_shape, num_classes, dropout=tc.dropout, weight_decay=tc.weight_decay,
                        width=tc.width, convs_per_block=tc.convs_per_block)
    schedule = Schedule.from_config(tc)
    split = Split(model, schedule, tc.model) if schedule.active else None
    return model, split, build_optimizers(tc, model, split, mixed)


def _fmt(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.4f}"


class _Worker:
    """One Horovod process's training run: setup in ``__init__``, then :meth:`run`."""

    def __init__(self, spec: Dict[str, Any], cfg: "Config", hvd: Any) -> None:
        import keras

        from pipeline.imaging.stored import ImageSpec

        self.t_start = time.time()
        self.spec, self.cfg, self.tc, self.hvd = spec, cfg, cfg.train, hvd
        self.rank, self.size = hvd.rank(), hvd.size()
        self.data_uri, self.model_dir = spec["data_uri"], spec["model_dir"]
        self.fault: Optional[faults.FaultPlan] = spec.get("fault")
        self.choice, self.mixed = _pin_devices(self.tc, hvd.local_rank())
        keras.utils.set_random_seed(self.tc.seed)  # same initial weights everywhere; broadcast makes it certain
        self.manifest = read_manifest(self.data_uri)
        self.num_classes = len(self.manifest.classes)
        self.val_rows = int(self.manifest.splits.get("val", 0))
        self.model, self.split, self.optimizer = _build(self.tc, ImageSpec.from_manifest(self.manifest).shape,
                                                        self.num_classes, self.mixed)
        self.schedule = Schedule.from_config(self.tc)
        self.fs = filesystem(self.model_dir)
        self.es = EarlyStopping(self.tc.early_stopping.metric, self.tc.early_stopping.patience,
                                self.tc.early_stopping.min_delta)
        self.history: List[Dict[str, Any]] = []
        self.resumed_from: Optional[str] = None
        self.start_epoch = self.epochs_run = self.train_images = 0
        self.train_seconds = 0.0
        self.first_step_unix: Optional[float] = None
        self.tensorboard: Optional[outputs.TensorBoardLog] = None
        self.heartbeat = Heartbeat(self.fs if self.rank == 0 else None, self.model_dir, str(spec.get("run_id", "")),
                                   every_s=max(1.0, min(10.0, self.tc.step_timeout / 10)))

    # --- resume: rank 0 reads, everybody receives -----------------------------------------
    def _read_checkpoint(self) -> Dict[str, Any]:
        self.fs.mkdirs(join(self.model_dir, CHECKPOINTS_DIR))
        found = checkpoints.find_latest(self.fs, self.model_dir)
        if found is None:
            self._init_weights()
            return {}
        loaded = checkpoints.load(self.fs, self.model_dir, found[1], self.model, self.optimizer)
        if loaded.get("fingerprint") != self.spec["fingerprint"]:
            raise ValueError(f"checkpoint {found[1]} in {self.model_dir} was trained on other data or another "
                             "model: use --mode overwrite or another --model-dir")
        log.info("resuming from %s/%s/%s (epoch %d, step %d)", self.model_dir, CHECKPOINTS_DIR, found[1],
                 int(loaded["epoch"]), int(self.optimizer.iterations.numpy()))
        return {"epoch": int(loaded["epoch"]), "history": list(loaded["history"]),
                "early_stopping": loaded["early_stopping"], "resumed_from": found[1]}

    def _init_weights(self) -> None:
        """A fresh run: ``train.init_weights`` as the driver resolved it (rank 0; the broadcast shares it)."""
        if not self.spec.get("init_weights"):
            return
        from pipeline.train.init_weights import WeightsSource, apply

        apply(self.model, WeightsSource.from_dict(self.spec["init_weights"]), model_name=self.tc.model)

    def _restore(self) -> None:
        state: Dict[str, Any] = {"epoch": 0, "history": [], "early_stopping": self.es.to_dict(),
                                 "resumed_from": None, "error": None}
        if self.rank == 0:
            try:
                state.update(self._read_checkpoint())
            except Exception as e:  # noqa: BLE001 - reported to every rank, then raised everywhere
                state["error"] = f"{type(e).__name__}: {e}"
        state = self.hvd.broadcast_object(state, root_rank=0, name="pixelmill_resume_state")
        if state["error"]:
            raise RuntimeError(f"resume failed: {state['error']}")
        for v in [*self.model.variables, *self.optimizer.variables]:
            v.assign(self.hvd.broadcast(v.value, root_rank=0))
        self.es = EarlyStopping.from_dict(state["early_stopping"])
        self.history, self.start_epoch, self.resumed_from = state["history"], int(state["epoch"]), state["resumed_from"]

    # --- the run --------------------------------------------------------------------------------
    def run(self) -> Dict[str, Any]:
        import tensorflow as tf

        self._restore()
        with contextlib.ExitStack() as stack:
            if self.rank == 0:
                self.tensorboard = stack.enter_context(outputs.TensorBoardLog(self.fs, self.model_dir))
            self.tracker = stack.enter_context(tracking.for_rank(self.spec, self.rank, self.cfg))  # rank 0 logs
            self.heartbeat.beat("started", force=True)
            if self.start_epoch < self.tc.epochs and not self.es.stopped:
                self._fit()
            # All ranks wait for rank 0's files before anyone reports success.
            self.hvd.allreduce(tf.constant(0.0), op=self.hvd.Sum, name="pixelmill_epochs_done")
            result = self._result()
            self.hvd.allreduce(tf.constant(0.0), op=self.hvd.Sum, name="pixelmill_export_done")
            return result

    def _result(self) -> Dict[str, Any]:
        result: Dict[str, Any] = {"rank": self.rank, "size": self.size,
                                  "weights_sha256": outputs.weights_digest([v.numpy() for v in self.model.variables]),
                                  "gpu": self.choice.address, "gpu_source": self.choice.source}
        if self.rank != 0:
            return result
        if not self.history:
            raise RuntimeError("no epoch was trained and no checkpoint exists: check train.epochs")
        result.update(outputs.export(self.fs, self.model_dir, model=self.model, spec=self.spec, cfg=self.cfg,
                                     manifest=self.manifest, history=self.history, es=self.es))
        self.tracker.outputs(self.fs, self.model_dir)
        result.update(
            resumed_from=self.resumed_from, start_epoch=self.start_epoch, epochs_run=self.epochs_run,
            first_step_unix=self.first_step_unix, process_start_unix=self.t_start,
            images_per_second=(self.train_images / self.train_seconds) if self.train_seconds > 0 else None,
        )
        return result

    def _fit(self) -> None:
        from pipeline import dataset

        tc = self.tc
        with contextlib.ExitStack() as stack:
            train = stack.enter_context(dataset.train_dataset(
                self.data_uri, self.cfg, rank=self.rank, size=self.size, batch_size=tc.batch_size,
                seed=tc.seed + 1000 * self.start_epoch, pixels="uint8"))
            # uint8 batches: a quarter of the bytes through tf.data and to the device; the compiled
            # steps normalise them (train.model_input), on the GPU when there is one
            val = (stack.enter_context(dataset.eval_dataset(self.data_uri, self.cfg, split="val", rank=self.rank,
                                                            size=self.size, batch_size=tc.batch_size,
                                                            pixels="uint8"))
                   if self.val_rows > 0 else None)
            k = tc.accumulate_steps
            steps = int(train.steps_per_epoch) // k  # optimizer updates; each reads k micro-batches
            if steps < 1:
                raise RuntimeError(f"the train split gives {int(train.steps_per_epoch)} batch(es) per epoch, fewer "
                                   f"than train.accumulate_steps={k}: lower train.batch_size or accumulate_steps")
            rate = learning_rate_schedule(base_lr=tc.learning_rate, size=self.size,
                                          warmup_steps=int(round(tc.warmup_epochs * steps)), schedule=tc.lr_schedule,
                                          total_steps=steps * tc.epochs, min_ratio=tc.min_lr_ratio)
            train_steps: Dict[str, TrainStep] = {}
            eval_step = make_eval_step(self.model, train.model_input)
            it = iter(train.dataset)
            if self.rank == 0:
                log.info("training %s on %d process(es): %d steps/epoch x %d images/step%s, epochs %d..%d", tc.model,
                         self.size, steps, tc.batch_size * self.size * k,
                         f" ({k} micro-batches of {tc.batch_size} per process)" if k > 1 else "",
                         self.start_epoch + 1, tc.epochs)
            for epoch in range(self.start_epoch + 1, tc.epochs + 1):
                phase = self.schedule.phase(epoch)
                if phase not in train_steps:  # a new phase: its trainable set, traced once, on every rank alike
                    if self.rank == 0 and phase != "full":
                        log.info("epoch %d: phase %s", epoch, phase)
                    train_steps[phase] = TrainStep(
                        self.hvd, self.model, self.optimizer, rate=rate, num_classes=self.num_classes,
                        label_smoothing=tc.label_smoothing, mixed=self.mixed, compression=tc.compression,
                        accumulate_steps=k, phase=phase, split=self.split,
                        backbone_lr_multiplier=tc.backbone_lr_multiplier,
                        class_weights=self.spec.get("class_weights"), model_input=train.model_input)
                t_epoch = time.time()
                row = self._train_epoch(epoch, it, steps, train_steps[phase], phase)
                if val is not None:
                    row.update(self._validate(epoch, val.dataset, eval_step))
                row["epoch_seconds"] = time.time() - t_epoch
                self._end_epoch(row)
                if self.es.stopped:
                    break

    def _allreduce_sum(self, values: List[float], name: str) -> List[float]:
        import tensorflow as tf

        out = self.hvd.allreduce(tf.constant(values, tf.float64), op=self.hvd.Sum, name=name)
        return [float(v) for v in out.numpy()]

    def _train_epoch(self, epoch: int, it: Iterator[Any], steps: int, train_step: Callable[..., Any],
                     phase: str) -> Dict[str, Any]:
        """``steps`` updates, then totals and BatchNorm statistics agreed across ranks; the epoch's train row."""
        import tensorflow as tf

        t_epoch = time.time()
        sums: List[Any] = []
        for step in range(1, steps + 1):
            faults.fire(self.fault, "train.step", rank=self.rank, epoch=epoch, step=step)
            sums.append(train_step([next(it) for _ in range(self.tc.accumulate_steps)]))
            if self.first_step_unix is None:
                float(sums[-1][0])  # wait for the step to finish
                self.first_step_unix = time.time()
            self.heartbeat.beat(f"epoch={epoch} step={step}")
        loss_sum = float(tf.add_n([s[0] for s in sums]))
        correct = float(tf.add_n([s[1] for s in sums]))
        count = float(sum(int(s[2]) for s in sums))
        seconds = time.time() - t_epoch
        loss_sum, correct, count = self._allreduce_sum([loss_sum, correct, count], f"train_totals_{epoch}")
        # BatchNorm statistics saw different shards: average them so all ranks hold one model.
        for v in (self.split.synced(phase) if self.split is not None else self.model.non_trainable_variables):
            v.assign(self.hvd.allreduce(v.value, op=self.hvd.Average, name=f"sync_{epoch}_{v.path}"))
        # The first epoch of a run (graph tracing, reader start-up) is not steady state.
        if epoch > self.start_epoch + 1 or self.start_epoch + 1 == self.tc.epochs:
            self.train_seconds += seconds
            self.train_images += int(count)
        return {"epoch": epoch, "phase": phase, "train_loss": loss_sum / max(count, 1.0), "train_accuracy": correct / max(count, 1.0),
                "val_loss": None, "val_accuracy": None, "learning_rate": float(sums[-1][3]),
                "images_per_second": count / max(seconds, 1e-9)}

    def _validate(self, epoch: int, data: Any, eval_step: Callable[..., Any]) -> Dict[str, float]:
        """One pass over this rank's share of the val split; the totals of all ranks."""
        loss, correct, count = 0.0, 0.0, 0.0
        for x, y in data:
            a, b, c = eval_step(x, y)
            loss, correct, count = loss + float(a), correct + float(b), count + int(c)
            self.heartbeat.beat(f"epoch={epoch} validating")
        loss, correct, count = self._allreduce_sum([loss, correct, count], f"val_totals_{epoch}")
        if int(count) != self.val_rows:
            raise RuntimeError(f"validation saw {int(count)} rows, the manifest says the val split "
                               f"has {self.val_rows}: the dataset layer broke exactly-once")
        return {"val_loss": loss / count, "val_accuracy": correct / count}

    def _end_epoch(self, row: Dict[str, Any]) -> None:
        """Record the epoch: history, early stopping, the log line, rank 0's outputs, a forced beat."""
        epoch = row["epoch"]
        self.history.append(row)
        self.epochs_run += 1
        self.es.update(epoch, self.es.monitored(row))
        line = (f"epoch {epoch}/{self.tc.epochs}  loss {row['train_loss']:.4f}  acc {row['train_accuracy']:.4f}  "
                f"val_loss {_fmt(row['val_loss'])}  val_acc {_fmt(row['val_accuracy'])}  "
                f"lr {row['learning_rate']:.2e}  {row['images_per_second']:.0f} img/s  {row['epoch_seconds']:.1f}s")
        if self.rank == 0:
            log.info("%s", line)
            outputs.write_epoch_outputs(self.fs, self.model_dir, model=self.model, optimizer=self.optimizer,
                                        tensorboard=self.tensorboard, history=self.history, es=self.es,
                                        fingerprint=self.spec["fingerprint"], tc=self.tc)
            self.tracker.epoch(row)
        self.heartbeat.beat(f"epoch={epoch} done", force=True, epoch_line=line)
        if self.es.stopped and self.rank == 0:
            log.info("early stopping: %s has not improved for %d epochs (best %.4f at epoch %d)",
                     self.es.metric, self.es.patience + 1, self.es.best, self.es.best_epoch)
