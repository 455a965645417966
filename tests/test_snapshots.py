"""Versioned outputs: one exclusive snapshot create is the commit; readers see whole versions only."""
from __future__ import annotations

import pytest

from pipeline.errors import DataError
from pipeline.fs import filesystem, join, to_uri
from pipeline.snapshots import ConcurrentCommitError, DataFile, VersionedOutput


def _write(out: VersionedOutput, rows_by_name: dict, *, keep=()):
    w = out.begin()
    files = list(keep)
    for name, rows in rows_by_name.items():
        uri = join(w.data_uri, name)
        out.fs.write_bytes(uri, b"x" * rows)
        files.append(DataFile(w.rel(uri), rows, "images"))
    return w, files


@pytest.fixture()
def out(tmp_path):
    return VersionedOutput(filesystem(str(tmp_path)), to_uri(str(tmp_path / "out")))


def test_nothing_is_visible_until_the_snapshot_is_created(out):
    assert out.snapshot() is None
    w, files = _write(out, {"a.parquet": 3})
    assert out.versions() == [] and out.snapshot() is None  # data written, not committed
    snap = w.commit(files, info={"accepted": 3})
    assert out.versions() == [1]
    assert out.snapshot().files == snap.files and out.snapshot().rows("images") == 3
    assert out.snapshot().info == {"accepted": 3}


def test_a_second_writer_racing_for_the_same_version_fails_and_the_winner_stays_intact(out):
    a, fa = _write(out, {"a.parquet": 2})
    b, fb = _write(out, {"b.parquet": 5})
    assert a.version == b.version == 1 and a.data_uri != b.data_uri
    a.commit(fa)
    with pytest.raises(ConcurrentCommitError, match="another writer committed version 1 .* first"):
        b.commit(fb)
    snap = out.snapshot()
    assert [f.path for f in snap.files] == [f.path for f in fa] and snap.rows() == 2
    assert all(out.fs.exists(u) for u in snap.uris(out.root))


def test_a_reader_of_version_n_keeps_reading_it_while_n_plus_1_commits(out):
    w1, f1 = _write(out, {"a.parquet": 2})
    w1.commit(f1)
    pinned = out.snapshot()
    w2, f2 = _write(out, {"b.parquet": 4})
    w2.commit(f2)
    assert out.snapshot().version == 2
    assert out.snapshot(pinned.version).files == pinned.files
    assert [out.fs.read_bytes(u) for u in pinned.uris(out.root)] == [b"xx"]


def test_versions_beyond_retain_are_removed_but_files_a_retained_snapshot_lists_are_kept(out):
    w1, f1 = _write(out, {"a.parquet": 2})
    w1.commit(f1, retain=2)
    w2, f2 = _write(out, {"b.parquet": 3}, keep=f1)  # an append: the new version lists the old file too
    w2.commit(f2, retain=2)
    w3, f3 = _write(out, {"c.parquet": 1}, keep=f2)
    w3.commit(f3, retain=2)
    assert out.versions() == [2, 3]
    assert all(out.fs.exists(u) for u in out.snapshot().uris(out.root))  # v1's folder survives: v3 lists it
    w4, f4 = _write(out, {"d.parquet": 1})  # an overwrite: nothing carried over
    w4.commit(f4, retain=1)
    assert out.versions() == [4]
    assert sorted(e.name for e in out.fs.entries(join(out.root, "_v"))) == [w4.folder.split("/")[1]]


def test_a_crashed_writers_folder_is_never_read_and_is_removed_by_a_later_commit(out):
    crashed, _ = _write(out, {"half.parquet": 9})  # never committed
    w, f = _write(out, {"a.parquet": 1})
    assert w.version == crashed.version  # the crash consumed no version
    w.commit(f)
    w2, f2 = _write(out, {"b.parquet": 1})
    w2.commit(f2)
    assert not out.fs.exists(crashed.data_uri)


def test_an_unknown_version_is_one_line_naming_the_committed_ones(out):
    w, f = _write(out, {"a.parquet": 1})
    w.commit(f)
    with pytest.raises(DataError, match=r"has no version 7 \(committed: 1\): pass one of those to --data-version"):
        out.snapshot(7)
