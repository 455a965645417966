"""Which GPU a Horovod process uses: the one Spark assigned to its task.

With Spark resource scheduling (``conf/gpu.yaml``), each task is given GPU
addresses found by ``scripts/get_gpus_resources.sh`` (physical ``nvidia-smi``
indices). TensorFlow numbers the GPUs it *sees*, which differ from the
physical indices when ``CUDA_VISIBLE_DEVICES`` is set (YARN and Kubernetes
isolate GPUs that way), so the address is mapped to TensorFlow's index here.
Without an assignment the process falls back to ``local_rank % visible``.

The selection logic is pure (:func:`gpu_addresses`, :func:`select_gpu`) so it is
unit-tested with fake resource maps; :func:`pin_gpu` applies a choice to
TensorFlow.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, List, Mapping, Optional, Sequence

from pipeline.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GpuChoice:
    """``index``: TensorFlow's GPU index to pin (None = run on CPU); ``source``: why."""

    index: Optional[int]
    source: str  # "spark" | "local_rank" | "cpu"
    address: Optional[str] = None


def gpu_addresses(resources: Optional[Mapping[str, Any]], name: str = "gpu") -> List[str]:
    """The GPU addresses in a Spark task resource map, in the order Spark gave them.

    Accepts what ``TaskContext.resources()`` returns (``{"gpu": ResourceInformation}``
    with ``.addresses``) and plain test doubles: ``{"gpu": ["0", "1"]}`` or
    ``{"gpu": {"addresses": ["0"]}}``.
    """
    if not resources or name not in resources:
        return []
    info = resources[name]
    if hasattr(info, "addresses"):
        addrs = info.addresses
    elif isinstance(info, Mapping):
        addrs = info.get("addresses", [])
    else:
        addrs = info
    return [str(a).strip() for a in (addrs or []) if str(a).strip()]


def _visible_list(cuda_visible_devices: Optional[str]) -> Optional[List[str]]:
    if cuda_visible_devices is None:
        return None
    items = [d.strip() for d in cuda_visible_devices.split(",") if d.strip()]
    return items


def select_gpu(assigned: Sequence[str], *, local_rank: int, num_visible: int,
               cuda_visible_devices: Optional[str] = None) -> GpuChoice:
    """Choose the TensorFlow GPU index for one Horovod process.

    Parameters
    ----------
    assigned:
        GPU addresses Spark assigned to this task (see :func:`gpu_addresses`).
    local_rank:
        Horovod local rank, the fallback when Spark assigned nothing.
    num_visible:
        How many GPUs TensorFlow lists (``tf.config.list_physical_devices("GPU")``).
    cuda_visible_devices:
        The process's ``CUDA_VISIBLE_DEVICES`` (None when unset); maps physical
        addresses to TensorFlow indices.

    Examples
    --------
    >>> select_gpu(["3"], local_rank=0, num_visible=4).index
    3
    >>> select_gpu(["3"], local_rank=0, num_visible=2, cuda_visible_devices="2,3").index
    1
    >>> select_gpu([], local_rank=1, num_visible=0).source
    'cpu'
    """
    if num_visible <= 0:
        if assigned:
            log.warning("Spark assigned GPU(s) %s but TensorFlow sees none: training on CPU "
                        "(is the GPU build of TensorFlow installed on the executors?)", list(assigned))
        return GpuChoice(None, "cpu")
    visible = _visible_list(cuda_visible_devices)
    if assigned:
        # One Horovod process per task: a task given several GPUs uses the first.
        address = str(assigned[0])
        if visible is not None and len(visible) == num_visible:
            if address in visible:
                return GpuChoice(visible.index(address), "spark", address)
            if len(visible) == 1:
                # The resource manager isolated exactly this GPU and renumbered it.
                return GpuChoice(0, "spark", address)
            raise ConfigError(
                f"Spark assigned GPU {address!r} but CUDA_VISIBLE_DEVICES={cuda_visible_devices!r}: "
                "make spark.executor.resource.gpu.discoveryScript report the same ids the executor sees"
            )
        try:
            idx = int(address)
        except ValueError:
            raise ConfigError(
                f"Spark assigned GPU address {address!r}, not an integer index: "
                "the discovery script must print nvidia-smi indices"
            ) from None
        if not 0 <= idx < num_visible:
            raise ConfigError(
                f"Spark assigned GPU {idx} but this process sees {num_visible} GPU(s): "
                "check spark.executor.resource.gpu.discoveryScript and CUDA_VISIBLE_DEVICES"
            )
        return GpuChoice(idx, "spark", address)
    return GpuChoice(local_rank % num_visible, "local_rank")


def pin_gpu(choice: GpuChoice, *, memory_growth: bool = True) -> None:
    """Make ``choice`` the only GPU TensorFlow uses (call before any TF op runs)."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if choice.index is None or not gpus:
        return
    gpu = gpus[choice.index]
    tf.config.set_visible_devices(gpu, "GPU")
    if memory_growth:
        tf.config.experimental.set_memory_growth(gpu, True)
    log.info("pinned GPU %s (TensorFlow index %d, chosen by %s)", choice.address or choice.index,
             choice.index, choice.source)
