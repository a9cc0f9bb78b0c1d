"""Atomic writes: an interrupted write leaves the previous file intact and no debris."""

from pathlib import Path

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


# -- outputs that would overwrite what a command reads (found by a robustness audit: each exited 0) -----------


def test_an_output_may_not_be_an_input_another_output_or_a_run_file(tmp_path):
    from itpk.io import clash_problems

    data = tmp_path / "d.csv"
    data.write_text("x")
    (tmp_path / "link.csv").symlink_to(data)
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text("{}")
    problems = clash_problems({"--out": tmp_path / "link.csv", "--plot": tmp_path / "p.png", "--log": tmp_path / "p.png",
                               "--x": run / "summary.csv", "--y": run / "report.html", "--z": None},
                              {"the dataset": data, "the model file": None})
    assert problems == [f"--out {tmp_path / 'link.csv'}: is the dataset, which this command uses; give another file name",
                        f"--log {tmp_path / 'p.png'}: is also --plot; give each output its own file",
                        f"--x {run / 'summary.csv'}: is a file of the run directory {run}; write it elsewhere"]
    assert clash_problems({"--out": tmp_path / "new.csv"}, {"the dataset": data}) == []


def test_commands_refuse_to_overwrite_their_inputs(tmp_path):
    from typer.testing import CliRunner

    from itpk.cli.main import app

    theoph = tmp_path / "theoph.csv"
    theoph.write_bytes((Path(__file__).resolve().parents[1] / "data" / "theoph.csv").read_bytes())
    model = tmp_path / "m.toml"
    model.write_bytes((Path(__file__).resolve().parents[1] / "models" / "one_cpt_iv.toml").read_bytes())
    before = theoph.read_bytes(), model.read_bytes()
    runner = CliRunner()
    for args, text in [
        (["nca", theoph, "--out", theoph], "is the dataset"),
        (["nca", theoph, "--out", tmp_path / "theoph.units.toml"], "is its units file"),
        (["simulate", model, "--route", "iv", "--dose", "1", "--out", model], "is the model file"),
        (["compare", model, "--dose", "1", "--routes", "iv", "--out", tmp_path / "c.csv", "--plot", model], "is the model file"),
        (["simulate", "one_cpt_iv", "--route", "iv", "--dose", "1", "--out", tmp_path / "a.csv", "--plot", tmp_path / "a.csv"],
         "is also --out"),
    ]:
        result = runner.invoke(app, [str(a) for a in args])
        assert result.exit_code == 1 and text in result.output, (args, result.output)
    assert (theoph.read_bytes(), model.read_bytes()) == before and not (tmp_path / "a.csv").exists()


def test_a_fit_keeps_what_replacing_its_run_directory_would_delete(tmp_path):
    from typer.testing import CliRunner

    from itpk.cli.main import app

    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text("{}")
    (run / "summary.csv").write_text("old")
    data = run / "trial.csv"
    data.write_bytes((Path(__file__).resolve().parents[1] / "data" / "theoph.csv").read_bytes())
    runner = CliRunner()
    result = runner.invoke(app, ["fit", str(data), "--model", "one_cpt_oral", "--out", str(run), "--method", "map"])
    assert result.exit_code == 1 and f"--out {run}: holds the dataset {data}" in result.output, result.output
    data.rename(tmp_path / "trial.csv")
    (run / "notes.txt").write_text("mine")
    (run / "plots").mkdir()
    result = runner.invoke(app, ["fit", str(tmp_path / "trial.csv"), "--model", "one_cpt_oral", "--out", str(run), "--method", "map"])
    assert result.exit_code == 1 and "the run directory also holds notes.txt, plots/" in result.output, result.output
    assert (run / "notes.txt").read_text() == "mine" and (run / "summary.csv").read_text() == "old"
    from itpk.errors import ItpkError
    from itpk.report import _check_target

    with pytest.raises(ItpkError, match="is a file of the run directory"):
        _check_target(run / "posterior.nc")  # itpk report RUN --out RUN/posterior.nc


def test_a_run_directory_s_own_model_and_hidden_files_do_not_block_a_refit(tmp_path):
    # from a review: --model RUN/model.toml (written back by the fit) and a .DS_Store or a killed write's
    # temporary sibling are not the user's work that replacing the directory would lose
    from itpk.run import check_run_target

    run = tmp_path / "run"
    run.mkdir()
    for name in ("run.json", "model.toml", "report.html", ".DS_Store", ".report.html.host-9.abc.tmp"):
        (run / name).write_text("x")
    assert check_run_target(run, inputs={"the model file": run / "model.toml", "the dataset": tmp_path / "d.csv"}) == run


def test_a_symlink_is_written_through_and_kept(tmp_path):
    # found by an audit: the rename replaced the link with a file and left its target as it was
    target = tmp_path / "real" / "target.csv"
    target.parent.mkdir()
    target.write_text("old")
    link = tmp_path / "link.csv"
    link.symlink_to(target)
    atomic_write(link, lambda tmp: tmp.write_text("new"))
    assert link.is_symlink() and target.read_text() == "new"
    assert [p.name for p in target.parent.iterdir()] == ["target.csv"]  # no temporary file left beside it


@pytest.mark.parametrize("behind_a_link", [False, True])
def test_a_named_pipe_is_written_into_not_replaced(tmp_path, behind_a_link):
    # renaming over a FIFO (or a device: an audit, as root, turned /dev/null into a CSV) replaces it with a
    # file; a stream is written into directly. Behind a link too: /dev/stdout is a link to /proc/self/fd/1,
    # a pipe under `| head`, and following it led to a folder of /proc where no temporary file can be made
    import os
    import threading

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    out = tmp_path / "out.csv" if behind_a_link else fifo
    if behind_a_link:
        out.symlink_to(fifo)
    received = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_text()))
    reader.start()
    atomic_write(out, lambda path: path.write_text("ID,TIME\n"))
    reader.join(timeout=10)
    assert received == ["ID,TIME\n"]
    assert fifo.is_fifo() and out.is_symlink() == behind_a_link


def test_a_loop_of_links_is_refused_and_left_as_it_is(tmp_path):
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    a.symlink_to(b)
    b.symlink_to(a)
    with pytest.raises(OSError, match="a symbolic link that never reaches a file"):
        atomic_write(a, lambda tmp: tmp.write_text("new"))
    assert a.is_symlink() and b.is_symlink()
