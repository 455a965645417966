"""Command-line contract shared by ``jobs/*.py`` (spark-submit) and ``python -m pipeline``.

The commands are the three stages and ``run`` (all of them in order on one session,
:mod:`pipeline.chain`). Every command takes ``[--config FILE]... [--set key=value]...`` plus its own
flags. Errors are one line on stderr; exit codes (see :mod:`pipeline.errors`):
0 ok, 1 the job failed, 2 bad arguments/config, 3 output exists.
The last line on stdout of a successful run is a JSON summary of the stage.
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from typing import Any, Callable, Dict, List, NoReturn, Optional, Sequence, Tuple

from pipeline.config import Config, load_config
from pipeline.errors import ConfigError, PixelmillError
from pipeline.fs import to_uri

log = logging.getLogger("pipeline")
#: The stages, each a job of its own (and a task of the Airflow DAG).
STAGES = ("ingest", "train", "score")
#: What ``pixelmill <command>`` accepts: the stages, and ``run`` for all of them on one session.
COMMANDS = (*STAGES, "run")
#: The module whose ``run(spark, cfg, **kwargs)`` a command calls, when not ``pipeline.<command>``.
_RUNNERS = {"run": "pipeline.chain"}
#: Values of ``pixelmill score --split``: one split of an ingest output, or ``all``.
#: The Airflow DAG's ``score_split`` param reads them from the parser (pipeline.orchestration).
SPLIT_CHOICES = ("train", "val", "test", "unlabeled", "all")
#: Values of ``pixelmill score --mode`` (``pipeline.score.driver.MODE_CHOICES``).
SCORE_MODES = ("error", "overwrite", "append")


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line and exits 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _one_of(flag: str, choices: Sequence[str]) -> Callable[[str], str]:
    """argparse ``type`` that refuses a value outside ``choices`` with the CLI's own message."""

    def check(value: str) -> str:
        if value not in choices:
            raise argparse.ArgumentTypeError(f"{flag} must be one of {', '.join(choices)} (got {value!r})")
        return value

    return check


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", action="append", default=[], metavar="FILE",
                   help="YAML overlay on conf/base.yaml (repeatable; e.g. conf/local.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override one config key, e.g. --set train.epochs=3 (repeatable)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def _train_flags(p: argparse.ArgumentParser) -> None:
    """Shorthands for train config keys (see :func:`stage_overrides`)."""
    p.add_argument("--num-proc", type=int, help="Horovod processes (overrides train.num_proc)")
    p.add_argument("--epochs", type=int, help="total epochs (overrides train.epochs)")


def _data_version_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-version", type=int, default=None, metavar="N",
                   help="read this committed version of --data (default: the newest; docs/contracts.md)")


def _split_flag(p: argparse.ArgumentParser, text: str) -> None:
    # choices= for --help and for the DAG's flag rendering; type= so a bad value gets the house message.
    p.add_argument("--split", default="test", choices=SPLIT_CHOICES, type=_one_of("--split", SPLIT_CHOICES), help=text)


def build_parser(stage: str, prog: Optional[str] = None) -> argparse.ArgumentParser:
    p = _Parser(prog=prog or f"pixelmill {stage}", description=_DESCRIPTIONS[stage])
    if stage == "ingest":
        p.add_argument("--input", help="raw images: <input>/[<split>/]<label>/.../<file> (with --input-list: the "
                                        "folder its relative paths and class folders are below)")
        p.add_argument("--input-list", help="a Parquet file/folder or .csv of path[,label[,split]]: ingest exactly "
                                             "these files, listed and read on executors")
        p.add_argument("--output", required=True, help="ingest output: images/, rejects/, _manifest.json")
        p.add_argument("--mode", default="error", choices=["error", "overwrite", "append"])
    elif stage == "train":
        p.add_argument("--data", required=True, help="an ingest output")
        _data_version_flag(p)
        p.add_argument("--model-dir", required=True, help="checkpoints, history, exported model")
        _train_flags(p)
        p.add_argument("--mode", default="resume", choices=["resume", "overwrite"])
    elif stage == "score":
        p.add_argument("--data", required=True, help="an ingest output")
        _data_version_flag(p)
        p.add_argument("--model", required=True, help="a training --model-dir or its model/")
        p.add_argument("--output", required=True, help="where predictions/ and _metrics.json go")
        _split_flag(p, "split to score (default: test)")
        p.add_argument("--mode", default="error", choices=list(SCORE_MODES))
    elif stage == "run":
        p.add_argument("--input", required=True, help="raw images, as ingest --input takes them")
        p.add_argument("--output-root", required=True,
                       help="every output goes under it: ingest/, model/, scores/, report/")
        _split_flag(p, "split to score and report on (default: test)")
        _train_flags(p)
        p.add_argument("--fresh", action="store_true",
                       help="redo every stage instead of reusing or resuming what --output-root holds")
    else:  # pragma: no cover
        raise ValueError(stage)
    _common(p)
    return p


_DESCRIPTIONS = {
    "ingest": "Clean raw images into split-partitioned Parquet; every file ends in images/ or rejects/.",
    "train": "Data-parallel training with Horovod on Spark executors; resumes from checkpoints.",
    "score": "Distributed batch scoring of an ingest output back to Parquet, with metrics when labelled.",
    "run": "Ingest, train, score and report on one SparkSession; a rerun reuses or resumes each stage's output.",
}


def parse_args(stage: str, argv: Sequence[str], prog: Optional[str] = None) -> argparse.Namespace:
    return build_parser(stage, prog).parse_args(list(argv))


def stage_overrides(stage: str, args: argparse.Namespace) -> List[str]:
    """Stage flags that are shorthands for config keys."""
    out: List[str] = []
    if stage in ("train", "run"):
        if args.num_proc is not None:
            out.append(f"train.num_proc={args.num_proc}")
        if args.epochs is not None:
            out.append(f"train.epochs={args.epochs}")
    return out


def load_stage_config(stage: str, args: argparse.Namespace) -> Config:
    return load_config(args.config, list(args.overrides) + stage_overrides(stage, args))


def stage_kwargs(stage: str, args: argparse.Namespace) -> Dict[str, Any]:
    """Keyword arguments of ``pipeline.<stage>.run`` from parsed flags (URIs normalised)."""
    if stage == "ingest":
        if args.input is None and args.input_list is None:
            raise ConfigError("ingest needs --input (a folder of images) or --input-list (a Parquet/CSV list of paths)")
        return {"input_uri": to_uri(args.input) if args.input else None, "output_uri": to_uri(args.output),
                "mode": args.mode, "input_list": to_uri(args.input_list) if args.input_list else None}
    if stage == "train":
        return {"data_uri": to_uri(args.data), "model_dir": to_uri(args.model_dir), "mode": args.mode,
                "data_version": args.data_version}
    if stage == "score":
        return {"data_uri": to_uri(args.data), "model_uri": to_uri(args.model),
                "output_uri": to_uri(args.output), "split": args.split, "mode": args.mode,
                "data_version": args.data_version}
    if stage == "run":  # --num-proc/--epochs are in the config already (stage_overrides)
        return {"input_uri": to_uri(args.input), "output_root": to_uri(args.output_root), "split": args.split,
                "fresh": args.fresh}
    raise ValueError(stage)  # pragma: no cover


def stage_runner(stage: str) -> Callable[..., Dict[str, Any]]:
    return importlib.import_module(_RUNNERS.get(stage, f"pipeline.{stage}")).run


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=getattr(logging, level, logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("py4j", "matplotlib", "PIL", "absl", "h5py", "petastorm"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def report_error(prog: str, err: BaseException) -> int:
    """Print one line for ``err`` and return the exit code."""
    if isinstance(err, PixelmillError):
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"{prog}: error: {msg}", file=sys.stderr)
        return err.exit_code
    if isinstance(err, KeyboardInterrupt):
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    log.exception("%s failed", prog)
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    print(f"{prog}: error: {type(err).__name__}: {first}", file=sys.stderr)
    return 1


def prepare(stage: str, argv: Sequence[str], prog: Optional[str] = None) -> Tuple[Config, Dict[str, Any]]:
    """Parse flags and load the config: everything that can fail before Spark starts."""
    args = parse_args(stage, argv, prog)
    setup_logging(args.log_level)
    cfg = load_stage_config(stage, args)
    return cfg, stage_kwargs(stage, args)


def emit_summary(summary: Dict[str, Any]) -> None:
    print(json.dumps(summary, sort_keys=True, default=str), flush=True)


def run_stage(stage: str, argv: Sequence[str], prog: Optional[str] = None) -> int:
    """Parse, configure, build the session, run the stage, stop the session."""
    from pipeline.spark import build_session

    prog = prog or f"pixelmill {stage}"
    try:
        cfg, kwargs = prepare(stage, argv, prog)
        spark = build_session(cfg.spark, app_suffix=stage)
        try:
            summary = stage_runner(stage)(spark, cfg, **kwargs)
        finally:
            spark.stop()
        emit_summary(summary)
        return 0
    except SystemExit as e:
        return int(e.code or 0)
    except BaseException as e:  # noqa: BLE001 - the CLI turns everything into an exit code
        return report_error(prog, e)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        usage = f"usage: pixelmill {{{','.join(COMMANDS)}}} [--config FILE] [--set KEY=VALUE]... [stage flags]"
        if argv and argv[0] not in ("-h", "--help"):
            print(f"pixelmill: error: unknown stage {argv[0]!r}: choose one of {', '.join(COMMANDS)}", file=sys.stderr)
            return 2
        print(usage)
        return 0 if argv else 2
    return run_stage(argv[0], argv[1:])
