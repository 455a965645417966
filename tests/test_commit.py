"""The commit protocol on real files: versions, readers, crashes at each step, racing writers, old layouts.

The stage-level proofs (a SIGKILLed driver at each commit step of a real ingest and a real
scoring) are in ``test_ingest.py`` and ``test_score.py``; these drive
:func:`pipeline.commit.versioned_output` directly, without Spark.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipeline import faults
from pipeline.commit import UnknownLayoutError, check_output_mode, committed, versioned_output
from pipeline.contracts import COMMIT_MARKER, read_manifest, resolve_ingest
from pipeline.errors import DataError, OutputExistsError
from pipeline.fs import filesystem, join, to_uri
from pipeline.snapshots import ConcurrentCommitError

MANIFEST = {"splits": {"train": 2}, "accepted": 2, "files_seen": 2,
            "image": {"height": 8, "width": 8, "channels": 1, "color_mode": "L", "format": "png"}}


def _write_version(out: str, rows: int, *, retain: int = 2, tag: str = "") -> str:
    """One committed version holding a manifest and a data file of ``rows`` bytes; returns its root."""
    fs = filesystem(out)
    with versioned_output(None, out, info={"tag": tag}, retain=retain) as v:
        fs.write_json(join(v.uri, "_manifest.json"), {**MANIFEST, "accepted": rows, "tag": tag})
        fs.write_bytes(join(v.uri, "images", "part-0.parquet"), b"x" * rows)
        v.add(join(v.uri, "images"), rows, "images")
    return committed(fs, out).root


@pytest.fixture()
def out(tmp_path) -> str:
    return to_uri(str(tmp_path / "out"))


def test_each_write_is_a_new_version_and_readers_see_the_newest(out):
    fs = filesystem(out)
    first = _write_version(out, 3, tag="a")
    second = _write_version(out, 5, tag="b")
    assert first != second
    found = committed(fs, out)
    assert (found.version, found.root, found.info["tag"]) == (2, second, "b")
    assert [(f.path.split("/", 2)[2], f.rows, f.kind) for f in found.files] == [("images", 5, "images")]
    assert read_manifest(out)["tag"] == "b"
    assert committed(fs, out, 1).root == first  # --data-version 1 still reads (retain 2)
    assert read_manifest(resolve_ingest(out, version=1).root)["tag"] == "a"


def test_a_reader_of_version_n_keeps_reading_it_while_n_plus_1_commits(out):
    fs = filesystem(out)
    _write_version(out, 3, tag="a")
    pinned = resolve_ingest(out)
    before = fs.read_bytes(join(pinned.root, "images", "part-0.parquet"))
    _write_version(out, 7, tag="b")
    assert resolve_ingest(out).version == 2
    assert read_manifest(pinned.root)["tag"] == "a"  # a version folder given directly: that version
    assert fs.read_bytes(join(pinned.root, "images", "part-0.parquet")) == before


def test_versions_beyond_retain_are_removed_by_the_writer(out):
    fs = filesystem(out)
    roots = [_write_version(out, n, retain=2) for n in (1, 2, 3)]
    assert not fs.exists(roots[0]) and fs.exists(roots[1]) and fs.exists(roots[2])
    with pytest.raises(DataError, match=r"has no version 1 \(committed: 2, 3\): pass one of those to --data-version"):
        committed(fs, out, 1)
    with pytest.raises(DataError, match="is not a committed version folder: pass the output folder"):
        committed(fs, roots[0])


def test_a_failed_write_commits_nothing_and_leaves_the_old_version(out):
    fs = filesystem(out)
    old = _write_version(out, 3, tag="old")
    with pytest.raises(RuntimeError, match="boom"):
        with versioned_output(None, out) as v:
            fs.write_bytes(join(v.uri, "images", "part-0.parquet"), b"half")
            raise RuntimeError("boom")
    assert not fs.exists(v.uri)
    assert committed(fs, out).root == old and read_manifest(out)["tag"] == "old"


def test_a_first_write_that_fails_leaves_no_folder(out, tmp_path):
    with pytest.raises(RuntimeError):
        with versioned_output(None, out) as v:
            filesystem(out).write_bytes(join(v.uri, "x"), b"1")
            raise RuntimeError("boom")
    assert not (tmp_path / "out").exists()


def test_two_writers_at_once_one_wins_the_other_fails_in_one_line_and_nothing_is_lost(out):
    fs = filesystem(out)
    _write_version(out, 1, tag="base")
    with pytest.raises(ConcurrentCommitError) as info:
        with versioned_output(None, out, info={"tag": "loser"}) as loser:
            fs.write_bytes(join(loser.uri, "images", "part-0.parquet"), b"LL")
            loser.add(join(loser.uri, "images"), 2, "images")
            winner_root = _write_version(out, 4, tag="winner")  # commits the same version number first
    assert "\n" not in str(info.value) and "another writer committed version 2" in str(info.value)
    found = committed(fs, out)
    assert (found.version, found.root, found.info["tag"]) == (2, winner_root, "winner")
    assert fs.read_bytes(join(winner_root, "images", "part-0.parquet")) == b"xxxx"
    assert not fs.exists(loser.uri)
    assert committed(fs, out, 1).info["tag"] == "base"  # the version before is intact too


def test_writers_in_separate_processes_race_and_exactly_one_commits(out, tmp_path):
    """Many real processes released together race for version 1: O_EXCL-style creation decides."""
    script = textwrap.dedent(f"""
        import sys, time
        from pipeline.commit import versioned_output
        from pipeline.fs import filesystem, join
        from pipeline.snapshots import ConcurrentCommitError
        out, me, go = {out!r}, sys.argv[1], {str(tmp_path / "go")!r}
        fs = filesystem(out)
        import os
        try:
            with versioned_output(None, out, info={{"tag": me}}) as v:
                fs.write_bytes(join(v.uri, "data"), me.encode())
                v.add(join(v.uri, "data"), 1, "data")
                open(go + "-" + me, "w").close()  # ready: folder written, version number taken
                while not os.path.exists(go):
                    time.sleep(0.005)
        except ConcurrentCommitError as e:
            print("LOST", e); sys.exit(1)
        print("WON")
    """)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    procs = [subprocess.Popen([sys.executable, "-c", script, f"w{i}"], stdout=subprocess.PIPE, text=True, env=env)
             for i in range(4)]
    import time

    deadline = time.time() + 60
    while len(list(tmp_path.glob("go-w*"))) < 4 and time.time() < deadline:
        time.sleep(0.05)  # every writer has written its folder and waits for the start signal
    (tmp_path / "go").touch()
    outs = [p.communicate(timeout=60)[0] for p in procs]
    codes = [p.returncode for p in procs]
    assert sorted(codes) == [0, 1, 1, 1], outs
    winner = f"w{codes.index(0)}"
    fs = filesystem(out)
    found = committed(fs, out)
    assert found.info["tag"] == winner and fs.read_bytes(join(found.root, "data")) == winner.encode()
    assert all("another writer committed version 1" in o for o, c in zip(outs, codes) if c == 1)
    assert [e.name for e in fs.entries(join(out, "_v"))] == [found.root.rsplit("/", 1)[1]]  # losers cleaned up


def test_a_snapshot_cut_short_is_not_a_commit_and_its_number_is_never_reused(out):
    fs = filesystem(out)
    first = _write_version(out, 2)
    fs.write_bytes(join(out, "_snapshots", "00000002.json"), b'{"format": 1, "vers')  # a writer died mid-PUT
    assert committed(fs, out).root == first
    third = _write_version(out, 3)
    assert committed(fs, out).version == 3 and committed(fs, out).root == third


@pytest.mark.parametrize("step", [1, 2, 3])
def test_a_crash_at_each_commit_step_leaves_the_old_version_or_the_new_one(out, tmp_path, step):
    """A SIGKILL of the writing process at step 1 (files written), 2 (snapshot created), 3 (pruning)."""
    _write_version(out, 3, tag="old", retain=1)
    script = textwrap.dedent(f"""
        from pipeline.commit import versioned_output
        from pipeline.fs import filesystem, join
        out = {out!r}
        fs = filesystem(out)
        with versioned_output(None, out, info={{"tag": "new"}}, retain=1) as v:
            fs.write_json(join(v.uri, "_manifest.json"), {{"tag": "new"}})
            fs.write_bytes(join(v.uri, "images", "part-0.parquet"), b"y" * 9)
            v.add(join(v.uri, "images"), 9, "images")
    """)
    env = {**os.environ, faults.ENV: f"commit:kill:step={step}",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == -9, r.stderr[-2000:]
    fs = filesystem(out)
    found = committed(fs, out)
    expect = "old" if step == 1 else "new"
    assert found.info["tag"] == expect
    # complete: every file the snapshot lists is there with its rows
    for f in found.files:
        data = b"".join(fs.read_bytes(u) for u in fs.list(join(out, f.path)))
        assert len(data) == f.rows == (3 if expect == "old" else 9)
    _write_version(out, 4, tag="next", retain=1)  # the next run succeeds and tidies up
    assert committed(fs, out).info["tag"] == "next"
    assert len(fs.entries(join(out, "_v"))) == 1 and len(fs.entries(join(out, "_snapshots"))) == 1


def _legacy_output(root: Path) -> str:
    """An ingest output as the earlier, unversioned layout wrote it."""
    (root / "images" / "split=train").mkdir(parents=True)
    (root / "images" / "split=train" / "part-0.parquet").write_bytes(b"old")
    (root / "_manifest.json").write_text(json.dumps({**MANIFEST, "tag": "legacy"}))
    (root / COMMIT_MARKER).write_text(json.dumps({"stage": "ingest"}))
    return to_uri(str(root))


def test_an_output_of_the_earlier_layout_reads_as_is_and_is_migrated_by_the_next_writes(tmp_path):
    out = _legacy_output(tmp_path / "old")
    fs = filesystem(out)
    found = committed(fs, out)
    assert (found.version, found.root) == (None, out) and read_manifest(out)["tag"] == "legacy"
    assert check_output_mode(fs, out, "overwrite") is True
    with pytest.raises(OutputExistsError, match="already exists: pass --mode overwrite"):
        check_output_mode(fs, out, "error")
    _write_version(out, 2, tag="v1", retain=2)
    assert read_manifest(out)["tag"] == "v1"
    assert (tmp_path / "old" / COMMIT_MARKER).exists()  # the old layout is still one of the 2 retained
    _write_version(out, 2, tag="v2", retain=2)
    assert sorted(p.name for p in (tmp_path / "old").iterdir()) == ["_snapshots", "_v"]


def test_a_folder_of_other_files_is_an_unknown_layout_naming_the_fix(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    uri = to_uri(str(tmp_path / "mine"))
    with pytest.raises(UnknownLayoutError, match=r"not a pixelmill output \(choose an empty or new folder"):
        check_output_mode(filesystem(uri), uri, "overwrite")
    with pytest.raises(DataError, match="is not a committed ingest output .*: re-run ingest"):
        read_manifest(uri)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "mine"
