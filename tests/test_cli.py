"""The CLI contract: one-line errors, exit codes, spark-submit and python -m entry points."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pipeline.cli import main


def test_no_stage_prints_usage_and_exits_2(capsys):
    assert main([]) == 2
    assert "usage: pixelmill" in capsys.readouterr().out


def test_unknown_stage_is_one_line(capsys):
    assert main(["ingestt"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown stage 'ingestt'" in err


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["ingest", "--output", "/tmp/x"], "needs --input (a folder of images) or --input-list"),
        (["ingest", "--input", "a", "--output", "b", "--mode", "replace"], "invalid choice: 'replace'"),
        (["train", "--data", "a", "--model-dir", "b", "--num-proc", "two"], "invalid int value"),
        (["score", "--data", "a", "--model", "m", "--output", "o", "--bogus"], "unrecognized arguments"),
        (["score", "--data", "a", "--model", "m", "--output", "o", "--data-version", "latest"], "invalid int value"),
    ],
)
def test_bad_flags_exit_2_with_one_line(capsys, argv, needle):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert needle in err


def test_bad_config_exits_2_before_spark_and_writes_nothing(capsys, tmp_path):
    out = tmp_path / "out"
    rc = main(["ingest", "--input", str(tmp_path), "--output", str(out), "--set", "ingest.height=3"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.count("\n") == 0 and "'ingest.height'" in err
    assert not out.exists()


def test_train_flags_are_validated_as_config(capsys, tmp_path):
    rc = main(["train", "--data", str(tmp_path), "--model-dir", str(tmp_path / "m"), "--num-proc", "0"])
    assert rc == 2
    assert "'train.num_proc'" in capsys.readouterr().err


def test_score_split_is_validated(capsys, tmp_path):
    rc = main(["score", "--data", str(tmp_path), "--model", "m", "--output", "o", "--split", "dev"])
    assert rc == 2
    assert "--split must be one of" in capsys.readouterr().err


@pytest.mark.parametrize("stage", ["ingest", "train", "score"])
def test_spark_submit_job_rejects_bad_flag(repo_root, stage):
    env = dict(os.environ, PYSPARK_PYTHON=sys.executable)
    proc = subprocess.run(
        ["spark-submit", "--master", "local[1]", str(repo_root / "jobs" / f"{stage}.py"), "--no-such-flag"],
        capture_output=True, text=True, timeout=180, env=env,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    # spark-submit merges the Python driver's stderr into its stdout.
    assert f"jobs/{stage}.py: error:" in proc.stdout + proc.stderr


def test_console_script_and_module_help(repo_root):
    for cmd in (["pixelmill", "ingest", "--help"], [sys.executable, "-m", "pipeline", "train", "--help"]):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert "--config" in proc.stdout and "--set" in proc.stdout


@pytest.mark.parametrize("stage, argv", [("train", ["--model-dir", "m"]), ("score", ["--model", "m", "--output", "o"])])
def test_data_version_reaches_the_stage(stage, argv):
    from pipeline.cli import parse_args, stage_kwargs

    assert stage_kwargs(stage, parse_args(stage, ["--data", "/d", *argv]))["data_version"] is None
    assert stage_kwargs(stage, parse_args(stage, ["--data", "/d", "--data-version", "3", *argv]))["data_version"] == 3
