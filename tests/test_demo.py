"""`make demo` end to end on a real Fashion-MNIST subset, through the real spark-submit jobs."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from outputs import version_dir


@pytest.mark.slow
def test_demo_runs_every_stage_and_writes_a_report(repo_root, tmp_path):
    work = tmp_path / "demo"
    cmd = [sys.executable, str(repo_root / "scripts" / "demo.py"), "--work", str(work), "--limit", "300",
           "--epochs", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1500, cwd=repo_root)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])

    assert 0.0 <= result["test_accuracy"] <= 1.0
    assert result["wall_seconds"] > 0
    stages = result["stages"]
    assert stages["export"]["images"] == 600
    assert stages["ingest"]["images"] == 600
    assert stages["ingest"]["accepted"] + stages["ingest"]["rejected"] == 600
    assert stages["score"]["images"] == 300  # the official test split, scored once each
    assert stages["train"]["epochs"] == 1

    manifest = json.loads((version_dir(work / "ingest") / "_manifest.json").read_text())
    assert manifest["splits"]["test"] == 300
    assert manifest["splits"]["val"] > 0  # carved from the official train split
    assert manifest["splits"]["train"] + manifest["splits"]["val"] == 300

    report = work / "report" / "index.html"
    html = report.read_text()
    assert str(report) == result["report"]
    for png in ("training_curves.png", "confusion_matrix.png", "class_balance.png"):
        assert (work / "report" / png).stat().st_size > 1000
        assert f"src='{png}'" in html
    assert "test accuracy" in html and "ankle_boot" in html and "Data quality" in html
    from browser import rendered

    shown = rendered(report)  # a real headless Chromium: the page renders and every image loads
    assert shown["total"] >= 3 and shown["loaded"] == shown["total"]
    # The summary table is printed before the JSON line.
    assert "stage" in proc.stdout and "ingest" in proc.stdout and "score" in proc.stdout

    # A rerun resumes: ingest is skipped, training finds its finished run, nothing is recomputed from scratch.
    proc2 = subprocess.run(cmd, capture_output=True, text=True, timeout=1500, cwd=repo_root)
    assert proc2.returncode == 0, proc2.stdout[-3000:] + proc2.stderr[-3000:]
    assert "ingest: already complete, skipped" in proc2.stdout
    again = json.loads(proc2.stdout.strip().splitlines()[-1])
    assert again["test_accuracy"] == result["test_accuracy"]


def _demo_module(repo_root):
    import importlib.util

    spec = importlib.util.spec_from_file_location("pixelmill_demo", repo_root / "scripts" / "demo.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_quick_look_shrinks_the_batch_only_when_the_subset_cannot_fill_it(repo_root):
    demo = _demo_module(repo_root)
    # The full Fashion-MNIST train split keeps the tuned batch.
    assert demo.quick_look_batch_size(54_019, num_proc=2, configured=256) is None
    # The CI quick look (258 train rows after val is carved out) gets several steps per epoch.
    batch = demo.quick_look_batch_size(258, num_proc=2, configured=256)
    assert batch is not None and batch * 2 * 4 <= 258 and batch * 2 * 2 * 4 > 258
    assert demo.quick_look_batch_size(3, num_proc=2, configured=256) == 1
