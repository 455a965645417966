"""GPU pinning from Spark task resources, with fake resource maps (no GPU needed)."""
from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from typing import List

import pytest

from pipeline.errors import ConfigError
from pipeline.train.gpu import GpuChoice, gpu_addresses, select_gpu


@dataclass
class FakeResourceInformation:
    """What ``TaskContext.resources()['gpu']`` looks like: a name and addresses."""

    name: str
    addresses: List[str]


def test_addresses_from_a_spark_like_resource_map():
    assert gpu_addresses({"gpu": FakeResourceInformation("gpu", ["2", "3"])}) == ["2", "3"]
    assert gpu_addresses({"gpu": {"addresses": [" 1 "]}}) == ["1"]
    assert gpu_addresses({"gpu": ["0"]}) == ["0"]
    assert gpu_addresses({"fpga": ["0"]}) == []
    assert gpu_addresses({}) == [] and gpu_addresses(None) == []


@pytest.mark.parametrize(
    "assigned, local_rank, num_visible, cvd, expected",
    [
        (["1"], 0, 4, None, GpuChoice(1, "spark", "1")),            # Spark's choice wins over local rank
        (["3", "0"], 1, 4, None, GpuChoice(3, "spark", "3")),       # several given: the first
        (["3"], 0, 2, "2,3", GpuChoice(1, "spark", "3")),           # physical id mapped through CUDA_VISIBLE_DEVICES
        (["5"], 0, 1, "5", GpuChoice(0, "spark", "5")),
        (["7"], 0, 1, "0", GpuChoice(0, "spark", "7")),             # isolated and renumbered by the cluster
        ([], 3, 2, None, GpuChoice(1, "local_rank")),               # no assignment: local rank modulo visible
        ([], 0, 0, None, GpuChoice(None, "cpu")),                   # no GPU at all
        (["0"], 0, 0, None, GpuChoice(None, "cpu")),                # assigned, but TF sees none: CPU, warned
    ],
)
def test_select_gpu(assigned, local_rank, num_visible, cvd, expected):
    assert select_gpu(assigned, local_rank=local_rank, num_visible=num_visible, cuda_visible_devices=cvd) == expected


@pytest.mark.parametrize(
    "assigned, num_visible, cvd, needle",
    [
        (["4"], 2, None, "sees 2 GPU(s)"),
        (["gpu-a"], 2, None, "not an integer index"),
        (["4"], 2, "0,1", "CUDA_VISIBLE_DEVICES='0,1'"),
    ],
)
def test_impossible_assignments_fail_with_one_line_naming_the_fix(assigned, num_visible, cvd, needle):
    with pytest.raises(ConfigError) as exc:
        select_gpu(assigned, local_rank=0, num_visible=num_visible, cuda_visible_devices=cvd)
    assert needle in str(exc.value) and "\n" not in str(exc.value)


def test_discovery_script_prints_spark_resource_json(repo_root):
    out = subprocess.run([str(repo_root / "scripts" / "get_gpus_resources.sh")], capture_output=True, text=True,
                         timeout=60, check=True)
    data = json.loads(out.stdout)
    assert data["name"] == "gpu"
    assert all(a.isdigit() for a in data["addresses"])


def test_discovery_script_lists_nvidia_smi_indices(repo_root, tmp_path):
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\nprintf '0\\n1\\n\\n3\\n'\n")
    fake.chmod(0o755)
    out = subprocess.run([str(repo_root / "scripts" / "get_gpus_resources.sh")], capture_output=True, text=True,
                         timeout=60, check=True, env={"PATH": f"{tmp_path}:/usr/bin:/bin"})
    assert json.loads(out.stdout) == {"name": "gpu", "addresses": ["0", "1", "3"]}


def test_gpu_overlay_wires_the_discovery_script(repo_root):
    from pipeline.config import load_config

    conf = load_config(["gpu.yaml"]).spark.conf
    assert conf["spark.task.resource.gpu.amount"] == "1"
    assert conf["spark.executor.resource.gpu.discoveryScript"].endswith("scripts/get_gpus_resources.sh")
