"""`pixelmill run`: the four stages on one session, idempotent on rerun, the CLI's contract.

The end-to-end test runs the real command (a subprocess: real Spark, real Horovod, real
files) on the small sample corpus, then reruns it and checks what a rerun must not redo;
the cases after that call the chain in this process, on the tests' session.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from outputs import version_dir
from pipeline.cli import main
from conftest import SAMPLE_INGEST_OVERRIDES

RUN_SETTINGS = ["--config", "local.yaml", "--set", "spark.ui_enabled=false", "--set", "spark.log_level=ERROR",
                "--set", "spark.conf.spark.driver.memory=2g", "--set", "spark.conf.spark.sql.shuffle.partitions=4",
                *[a for o in SAMPLE_INGEST_OVERRIDES for a in ("--set", o)],
                "--set", "train.batch_size=16", "--set", "loader.workers_count=1", "--set", "loader.shuffle_buffer=256"]


def _run(raw: Path, root: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = ["pixelmill", "run", "--input", str(raw), "--output-root", str(root), "--epochs", "1", "--num-proc", "2",
           *RUN_SETTINGS, *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900)


def _summary(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _progress(proc: subprocess.CompletedProcess, stage: str) -> list:
    """The progress lines of ``stage`` on stderr."""
    return [line for line in proc.stderr.splitlines() if f"pipeline.chain: {stage}: " in line]


def _outputs(root: Path) -> dict:
    """What a rerun must leave alone: the committed versions, the model's id and file, the predictions."""
    return {
        "ingest_version": str(version_dir(root / "ingest")),
        "model_card": json.loads((root / "model" / "model.json").read_text()),
        "model_file": (root / "model" / "model" / "model.keras").stat().st_mtime_ns,
        "scores_version": str(version_dir(root / "scores")),
        "predictions": sorted(str(p.relative_to(root)) for p in (version_dir(root / "scores") / "predictions").rglob("*.parquet")),
    }


@pytest.mark.slow
def test_run_chains_the_stages_and_a_rerun_redoes_nothing(spark, sample_config, raw_sample, tmp_path):
    root = tmp_path / "run"
    first = _run(raw_sample, root)
    result = _summary(first)
    stages = result["stages"]
    assert [stages[s]["action"] for s in ("ingest", "train", "score")] == ["ran", "ran", "ran"]
    assert stages["ingest"]["images"] == 144 == stages["ingest"]["accepted"] + stages["ingest"]["rejected"]
    assert stages["train"]["epochs"] == 1 and stages["train"]["epochs_run_now"] == 1
    manifest = json.loads((version_dir(root / "ingest") / "_manifest.json").read_text())
    assert stages["score"]["images"] == manifest["splits"]["test"] > 0
    assert result["train_rows"] == manifest["splits"]["train"]
    assert 0.0 <= result["accuracy"] <= 1.0
    assert result["accuracy"] == json.loads((version_dir(root / "scores") / "_metrics.json").read_text())["accuracy"]
    card = json.loads((root / "model" / "model.json").read_text())
    assert result["model_id"] == card["model_id"] == stages["score"]["model_id"]
    report = root / "report" / "index.html"
    assert result["report"] == str(report) and "test accuracy" in report.read_text()
    assert result["wall_seconds"] >= sum(stages[s]["seconds"] for s in ("ingest", "train", "score"))
    for stage in ("ingest", "train", "score", "report"):  # one progress line per stage, on stderr
        assert len(_progress(first, stage)) == 1, first.stderr[-3000:]
    before = _outputs(root)
    report_mtime = report.stat().st_mtime_ns

    # A rerun reuses ingest and scores, the train stage finds its finished run; only the report is rewritten.
    second = _run(raw_sample, root)
    again = _summary(second)
    assert [again["stages"][s]["action"] for s in ("ingest", "train", "score")] == ["reused", "skipped", "reused"]
    assert _outputs(root) == before
    assert again["accuracy"] == result["accuracy"] and again["model_id"] == result["model_id"]
    assert again["stages"]["score"]["images"] == stages["score"]["images"]
    assert report.stat().st_mtime_ns > report_mtime
    (line,) = _progress(second, "ingest")
    assert f"ingest: reused file://{root}/ingest" in line

    # In this process on the tests' session (no further JVM start): scores made by another model are not reused.
    from pipeline import chain
    from pipeline.errors import OutputExistsError

    marker = sorted((root / "scores" / "_snapshots").glob("*.json"))[-1]  # the scores' commit: made by another model
    snap = json.loads(marker.read_text())
    marker.write_text(json.dumps({**snap, "info": {**snap["info"], "model_id": "another-model"}}))
    third = chain.run(spark, sample_config, input_uri=str(raw_sample), output_root=str(root), epochs=1, num_proc=2)
    assert [third["stages"][s]["action"] for s in ("ingest", "train", "score")] == ["reused", "skipped", "ran"]
    newest = sorted((root / "scores" / "_snapshots").glob("*.json"))[-1]
    assert json.loads(newest.read_text())["info"]["model_id"] == result["model_id"]
    assert third["accuracy"] == result["accuracy"]

    # The output root holds an ingest of another input: refused, with the fix, before anything is replaced.
    with pytest.raises(OutputExistsError, match="--fresh"):
        chain.run(spark, sample_config, input_uri=str(tmp_path / "other"), output_root=str(root), epochs=1)
    assert _outputs(root)["ingest_version"] == before["ingest_version"]


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["run", "--input", "raw"], "--output-root"),
        (["run", "--input", "raw", "--output-root", "o", "--split", "dev"], "--split must be one of"),
        (["run", "--input", "raw", "--output-root", "o", "--epochs", "one"], "invalid int value"),
        (["run", "--input", "raw", "--output-root", "o", "--num-proc", "0"], "'train.num_proc'"),
        (["run", "--input", "raw", "--output-root", "o", "--mode", "overwrite"], "unrecognized arguments"),
    ],
)
def test_bad_run_arguments_exit_2_with_one_line_before_spark(capsys, tmp_path, argv, needle):
    argv = [str(tmp_path / a) if a in ("raw", "o") else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert err.startswith("pixelmill run: error:") and needle in err
    assert not (tmp_path / "o").exists()


def test_run_is_a_command_of_the_console_script_the_module_and_spark_submit(repo_root):
    for cmd in (["pixelmill", "run", "--help"], [sys.executable, "-m", "pipeline", "run", "--help"]):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert "--output-root" in proc.stdout and "--fresh" in proc.stdout and "--config" in proc.stdout
    proc = subprocess.run(["spark-submit", "--master", "local[1]", str(repo_root / "jobs" / "run.py"), "--no-such-flag"],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "jobs/run.py: error:" in proc.stdout + proc.stderr


def test_train_settings_given_to_the_chain_are_validated_like_the_config(test_config):
    from pipeline import chain
    from pipeline.errors import ConfigError

    assert chain.with_train(test_config) is test_config
    cfg = chain.with_train(test_config, num_proc=1, epochs=None, batch_size=8)
    assert (cfg.train.num_proc, cfg.train.epochs, cfg.train.batch_size) == (1, test_config.train.epochs, 8)
    with pytest.raises(ConfigError, match="'train.epochs'"):
        chain.with_train(test_config, epochs=0)
