"""Atomic writes: an interrupted write leaves the previous file intact and no debris."""

import pytest

from itpk.io import atomic_write, write_text


def test_interrupted_write_keeps_previous_file(tmp_path):
    target = tmp_path / "out.csv"
    target.write_text("old")

    def half_then_crash(tmp):
        tmp.write_text("new but incomplete")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, half_then_crash)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.csv"]


def test_write_replaces_and_creates_folders(tmp_path):
    target = tmp_path / "a" / "b.txt"
    write_text(target, "one")
    write_text(target, "two")
    assert target.read_text() == "two"
    assert [p.name for p in target.parent.iterdir()] == ["b.txt"]


def _dead_pid() -> int:
    """The PID of a process that has ended (a child that was waited for)."""
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_next_write_removes_what_a_killed_writer_left(tmp_path):
    import os
    import socket


    host = socket.gethostname()
    dead = _dead_pid()
    target = tmp_path / "out.csv"
    killed_file = tmp_path / f".out.csv.{host}-{dead}.abc123.tmp"
    killed_dir = tmp_path / f".out.csv.{host}-{dead}.def456.tmp"
    killed_file.write_text("half")
    killed_dir.mkdir()
    (killed_dir / "posterior.nc").write_text("half")
    running = tmp_path / f".out.csv.{host}-{os.getpid()}.ghi789.tmp"  # a write in progress (this process)
    elsewhere = tmp_path / f".out.csv.other-node-{dead}.jkl012.tmp"  # another host's: its PIDs mean nothing here
    unrelated = tmp_path / ".out.csv.notes"
    for path in (running, elsewhere, unrelated):
        path.write_text("keep")
    write_text(target, "new")
    assert target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out.csv", running.name, elsewhere.name, unrelated.name])


def test_a_set_aside_run_is_put_back_when_its_writer_died_between_the_renames(tmp_path):
    import socket

    from itpk.io import remove_stale

    target = tmp_path / "run"
    old = tmp_path / f".run.{socket.gethostname()}-{_dead_pid()}.old"
    old.mkdir()
    (old / "run.json").write_text("{}")
    remove_stale(target)
    assert (target / "run.json").read_text() == "{}"
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_replace_directory_swaps_in_the_new_folder(tmp_path, monkeypatch, exchange):
    from itpk import io

    if not exchange:
        monkeypatch.setattr(io, "_exchange", lambda a, b: False)
    target = tmp_path / "run"
    target.mkdir()
    (target / "a").write_text("old")
    for round_ in ("new", "newer"):
        new = io.temporary_sibling(target, directory=True)
        (new / "a").write_text(round_)
        io.replace_directory(new, target)
        assert (target / "a").read_text() == round_
        assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_exchange_swaps_two_folders_or_says_it_cannot(tmp_path):
    from itpk.io import _exchange

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("A")
    (b / "x").write_text("B")
    if _exchange(a, b):
        assert ((a / "x").read_text(), (b / "x").read_text()) == ("B", "A")
    else:  # no renameat2 here: nothing moved
        assert ((a / "x").read_text(), (b / "x").read_text()) == ("A", "B")


def test_a_failed_second_rename_puts_the_previous_folder_back(tmp_path, monkeypatch):
    # review (session 20): without the atomic exchange, an error between the two renames left the
    # previous run hidden as .NAME.HOST-PID.old until another process wrote there
    import os

    from itpk import io

    monkeypatch.setattr(io, "_exchange", lambda a, b: False)
    target = tmp_path / "run"
    target.mkdir()
    (target / "a").write_text("old")
    new = io.temporary_sibling(target, directory=True)
    real = os.replace

    def fail_second(src, dst):
        if str(src) == str(new):
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(io.os, "replace", fail_second)
    with pytest.raises(KeyboardInterrupt):
        io.replace_directory(new, target)
    assert (target / "a").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["run", new.name])
