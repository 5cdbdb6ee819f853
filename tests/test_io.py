"""Atomic writes: complete or absent, never half-written; a failure leaves the old content in place."""

import os

import pytest

from lmforge.io import atomic_path, atomic_write_json, atomic_write_text


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    path = tmp_path / "sub" / "a.txt"
    atomic_write_text(path, "one")
    atomic_write_text(path, "two")
    assert path.read_text() == "two"
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.txt"]
    assert os.stat(path).st_mode & 0o644 == 0o644


def test_failed_write_keeps_old_content(tmp_path):
    path = tmp_path / "a.json"
    atomic_write_json(path, {"ok": 1})
    with pytest.raises(TypeError):
        atomic_write_json(path, {"bad": object()})
    assert path.read_text().strip().startswith("{") and '"ok": 1' in path.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_atomic_dir_swaps_only_on_success(tmp_path):
    target = tmp_path / "model"
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "w.bin").write_text("v1")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.mkdir()
            (tmp / "w.bin").write_text("half")
            raise RuntimeError("killed")
    assert (target / "w.bin").read_text() == "v1"
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "w.bin").write_text("v2")
    assert (target / "w.bin").read_text() == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def _dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_check_replaceable_dir_refuses_foreign_dirs(tmp_path):
    from lmforge.errors import LmforgeError
    from lmforge.io import check_replaceable_dir

    check_replaceable_dir(tmp_path / "missing", "meta.json", "dataset dir")  # absent: fine
    (tmp_path / "empty").mkdir()
    check_replaceable_dir(tmp_path / "empty", "meta.json", "dataset dir")  # empty: fine
    ours = tmp_path / "ours"
    ours.mkdir()
    (ours / "meta.json").write_text("{}")
    check_replaceable_dir(ours, "meta.json", "dataset dir")  # has the marker: fine
    foreign = tmp_path / "data"
    foreign.mkdir()
    (foreign / "a.txt").write_text("precious")
    with pytest.raises(LmforgeError, match=r"data exists and is not a dataset dir \(no meta.json\)"):
        check_replaceable_dir(foreign, "meta.json", "dataset dir")
    assert (foreign / "a.txt").read_text() == "precious"


def test_atomic_path_removes_dead_process_temp_dirs(tmp_path):
    target = tmp_path / "out"
    dead = tmp_path / f".out.tmp-{_dead_pid()}"
    dead.mkdir()
    (dead / "half").write_text("x")
    alive = tmp_path / f".out.tmp-{os.getppid()}"  # a live process's temp dir is not ours to remove
    alive.mkdir()
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "f").write_text("new")
    assert not dead.exists() and alive.exists()
    assert (target / "f").read_text() == "new"


def test_atomic_path_restores_target_moved_aside_by_killed_process(tmp_path):
    target = tmp_path / "out"
    old = tmp_path / f".out.old-{_dead_pid()}"  # killed between `target -> old` and `tmp -> target`
    old.mkdir()
    (old / "f").write_text("previous")
    with pytest.raises(RuntimeError):
        with atomic_path(target):
            assert (target / "f").read_text() == "previous"  # restored on entry
            raise RuntimeError("fail")
    assert (target / "f").read_text() == "previous" and not old.exists()


def test_metrics_log_skips_a_torn_final_line(tmp_path):
    from lmforge.errors import DataError
    from lmforge.train.metrics import MetricsLog

    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.write({"kind": "train", "step": 1})
    log.write({"kind": "train", "step": 2})
    with open(log.path, "ab") as f:
        f.write(b'{"kind": "train", "st\xc3')  # killed mid-write
    assert [r["step"] for r in log.read()] == [1, 2]
    log.truncate_after(1)
    assert log.read() == [{"kind": "train", "step": 1}]
    log.path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')  # corruption elsewhere is still an error
    with pytest.raises(DataError, match=r"metrics.jsonl:2: not a JSON record"):
        log.read()
