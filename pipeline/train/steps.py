"""The data-parallel training step: gradients, their allreduce, the optimizer update(s).

One update (:class:`TrainStep`) reads ``train.accumulate_steps`` = k micro-batches of
``train.batch_size`` images per rank:

* k = 1: one compiled step, gradients allreduced by ``hvd.DistributedGradientTape``;
* k > 1: each micro-batch's gradients are added into local accumulators (no
  communication), then one compiled update averages them over the k micro-batches,
  allreduces them once (``hvd.grouped_allreduce``) and applies them. Up to summation order
  that is the gradient of one batch of k x ``batch_size`` images (except that BatchNorm
  normalises each micro-batch with its own statistics).

``train.compression: fp16`` sends the gradients as float16 in either allreduce
(``hvd.Compression.fp16``: half the bytes, gradients rounded to 11 significant bits; every
rank receives the same rounded sum, so ranks stay bit-identical).

Under a fine-tuning schedule (:mod:`pipeline.train.finetune`) the head's and the
backbone's variables have their own optimizers (:class:`Optimizers`), the backbone's at
``train.backbone_lr_multiplier`` x the head's rate. Under mixed precision the head's
optimizer is Keras 3's ``LossScaleOptimizer``: the loss is scaled by its ``dynamic_scale``,
the backbone's (plain) optimizer gets the gradients unscaled by that same scale, and a
non-finite backbone gradient makes the head's update non-finite too, so both skip the
step and the scale halves once.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, List, Optional, Sequence, Tuple

if TYPE_CHECKING:  # pragma: no cover
    from pipeline.config import TrainConfig
    from pipeline.train.finetune import Split


def make_optimizer(tc: "TrainConfig", mixed: bool) -> Any:
    """``train.optimizer`` (loss-scaled under mixed precision), not yet built."""
    import keras

    if tc.optimizer == "sgd":
        optimizer = keras.optimizers.SGD(learning_rate=tc.learning_rate, momentum=0.9, nesterov=True)
    else:
        optimizer = keras.optimizers.Adam(learning_rate=tc.learning_rate)
    return keras.optimizers.LossScaleOptimizer(optimizer) if mixed else optimizer


class Optimizers:
    """The head's optimizer and, under a fine-tuning schedule, the backbone's, saved and restored as one.

    ``variables`` (head's, then backbone's) is what a checkpoint's ``optimizer.npz`` holds;
    ``iterations`` (the head's: it updates on every step) drives the learning-rate schedule.
    Both are built before any checkpoint is restored, so a resume into either phase finds
    every variable it restores.
    """

    def __init__(self, head: Any, backbone: Optional[Any] = None) -> None:
        self.head, self.backbone = head, backbone

    @property
    def variables(self) -> List[Any]:
        return [*self.head.variables, *(self.backbone.variables if self.backbone is not None else [])]

    @property
    def iterations(self) -> Any:
        return self.head.iterations


def build_optimizers(tc: "TrainConfig", model: Any, split: Optional["Split"], mixed: bool) -> Optimizers:
    """Built optimizers: one over every trainable variable, or the head's and the backbone's."""
    head = make_optimizer(tc, mixed)
    if split is None:
        head.build(model.trainable_variables)
        return Optimizers(head)
    head.build(split.head_vars)
    backbone = make_optimizer(tc, False)  # unscaled by hand with the head's loss scale
    backbone.build(split.unfrozen_vars)
    return Optimizers(head, backbone)


def _accuracy_sum(probs: Any, y: Any) -> Any:
    import tensorflow as tf

    hits = tf.equal(tf.argmax(probs, -1, output_type=tf.int32), tf.cast(y, tf.int32))
    return tf.reduce_sum(tf.cast(hits, tf.float32))


def _all_finite(grads: Sequence[Any]) -> Any:
    import tensorflow as tf

    return tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in grads]) if grads else tf.constant(True)


class TrainStep:
    """One optimizer update over k micro-batches: ``step([(x, y), ...]) -> (loss x n, correct, n, lr)``.

    Parameters
    ----------
    hvd:
        ``horovod.tensorflow``, initialised.
    model, opts:
        The model and its :class:`Optimizers`.
    rate:
        The learning-rate schedule, called with the head optimizer's step count.
    phase, split:
        The fine-tuning phase and the model's :class:`~pipeline.train.finetune.Split`
        (None without a schedule: every trainable variable, one optimizer).
    model_input:
        Batch images -> the model's input, traced into the step (the loader's uint8 pixels
        normalised there, on the device); identity when None.
    """

    def __init__(self, hvd: Any, model: Any, opts: Optimizers, *, rate: Callable[[Any], Any], num_classes: int,
                 label_smoothing: float, mixed: bool, compression: str = "none", accumulate_steps: int = 1,
                 phase: str = "full", split: Optional["Split"] = None, backbone_lr_multiplier: float = 1.0,
                 class_weights: Optional[Sequence[float]] = None,
                 model_input: Optional[Callable[[Any], Any]] = None) -> None:
        import tensorflow as tf

        from pipeline.train.class_weights import weighted_loss

        self.hvd, self.model, self.opts, self.rate = hvd, model, opts, rate
        self.num_classes, self.mixed, self.k = num_classes, mixed, int(accumulate_steps)
        self.model_input = model_input or (lambda x: x)
        self.phase, self.split, self.multiplier = phase, split, float(backbone_lr_multiplier)
        self.compression = hvd.Compression.fp16 if compression == "fp16" else hvd.Compression.none
        # train.class_weight: each example's loss times its class's weight, the same table on every rank
        self.loss_of = weighted_loss(num_classes, label_smoothing, class_weights)
        if split is None:
            self.head_vars, self.backbone_vars = list(model.trainable_variables), []
        else:
            split.enter(phase)
            self.head_vars, self.backbone_vars = split.variables(phase)
        self.vars = [*self.head_vars, *self.backbone_vars]
        if self.k == 1:
            self._step = tf.function(self._one_step)
        else:
            self.acc = [tf.Variable(tf.zeros(v.shape, v.dtype), trainable=False) for v in self.vars]
            self._micro = tf.function(self._micro_step)
            self._update = tf.function(self._apply_accumulated)

    def __call__(self, batches: Sequence[Tuple[Any, Any]]) -> Tuple[Any, ...]:
        if self.k == 1:
            (x, y), = batches
            return self._step(x, y)
        out = [self._micro(x, y) for x, y in batches]
        lr = self._update()
        return sum(o[0] for o in out), sum(o[1] for o in out), sum(o[2] for o in out), lr

    # --- the pieces, traced by tf.function -----------------------------------------------------
    def _forward_loss(self, x: Any, y: Any) -> Tuple[Any, Any, Any, Any]:
        """``(tape, loss, scaled loss, probs)`` of one (micro-)batch."""
        import tensorflow as tf

        x = self.model_input(x)
        with tf.GradientTape() as tape:
            probs = self.split.forward(x, self.phase) if self.split is not None else self.model(x, training=True)
            loss = self.loss_of(y, probs)
            if self.model.losses:
                loss = loss + tf.add_n(self.model.losses)
            scaled = self.opts.head.scale_loss(loss) if self.mixed else loss
        return tape, loss, scaled, probs

    def _one_step(self, x: Any, y: Any) -> Tuple[Any, ...]:
        import tensorflow as tf

        lr = self._set_rates()
        tape, loss, scaled, probs = self._forward_loss(x, y)
        tape = self.hvd.DistributedGradientTape(tape, compression=self.compression)
        grads = tape.gradient(scaled, [v.value for v in self.vars])
        self._apply(grads)
        n = tf.shape(y)[0]
        return loss * tf.cast(n, tf.float32), _accuracy_sum(probs, y), n, lr

    def _micro_step(self, x: Any, y: Any) -> Tuple[Any, ...]:
        import tensorflow as tf

        tape, loss, scaled, probs = self._forward_loss(x, y)
        grads = tape.gradient(scaled, [v.value for v in self.vars])
        for a, g in zip(self.acc, grads):
            a.assign_add(g)
        n = tf.shape(y)[0]
        return loss * tf.cast(n, tf.float32), _accuracy_sum(probs, y), n

    def _apply_accumulated(self) -> Any:
        import tensorflow as tf

        lr = self._set_rates()
        mean = [a / tf.cast(self.k, a.dtype) for a in self.acc]
        grads = self.hvd.grouped_allreduce(mean, op=self.hvd.Average, compression=self.compression)
        self._apply(grads)
        for a in self.acc:
            a.assign(tf.zeros_like(a))
        return lr

    def _set_rates(self) -> Any:
        """The schedule's rate at the head optimizer's step (float64, rounded to the optimizer's float32)."""
        lr = self.rate(self.opts.iterations)
        self.opts.head.learning_rate = lr
        if self.opts.backbone is not None:
            self.opts.backbone.learning_rate = lr * self.multiplier
        return lr

    def _apply(self, grads: List[Any]) -> None:
        import tensorflow as tf

        nh = len(self.head_vars)
        head_grads, bb_grads = list(grads[:nh]), list(grads[nh:])
        if not bb_grads:
            self.opts.head.apply_gradients(zip(head_grads, self.head_vars))
            return
        if self.mixed:
            scale = tf.identity(self.opts.head.dynamic_scale)  # read before the head's update can change it
            bb_grads = [g / tf.cast(scale, g.dtype) for g in bb_grads]
            finite = tf.logical_and(_all_finite(bb_grads), _all_finite(head_grads))
            # A non-finite backbone gradient makes the head skip too (and halve the scale): one decision.
            head_grads[0] = head_grads[0] + tf.where(finite, 0.0, float("nan"))
            self.opts.head.apply_gradients(zip(head_grads, self.head_vars))

            def update() -> Any:
                self.opts.backbone.apply_gradients(zip(bb_grads, self.backbone_vars))
                return tf.constant(True)

            tf.cond(finite, update, lambda: tf.constant(False))
            return
        self.opts.head.apply_gradients(zip(head_grads, self.head_vars))
        self.opts.backbone.apply_gradients(zip(bb_grads, self.backbone_vars))


def eval_step(model: Any, model_input: Optional[Callable[[Any], Any]] = None) -> Callable[[Any, Any], Tuple[Any, ...]]:
    """One compiled validation step: ``(loss sum, correct, n)``; ``model_input`` as in :class:`TrainStep`."""
    import keras
    import tensorflow as tf

    prepare = model_input or (lambda x: x)

    @tf.function
    def step(x: Any, y: Any) -> Tuple[Any, ...]:
        x = prepare(x)
        probs = tf.cast(model(x, training=False), tf.float32)
        losses = keras.losses.sparse_categorical_crossentropy(tf.cast(y, tf.int32), probs)
        return tf.reduce_sum(losses), _accuracy_sum(probs, y), tf.shape(y)[0]

    return step
