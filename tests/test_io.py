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
