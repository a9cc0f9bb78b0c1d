"""Atomic output: an interrupted run leaves the previous file or run directory intact, or nothing.

Every output is written to a hidden temporary sibling, ``.NAME.HOST-PID.XXXX.tmp``, and renamed
over its target. A process killed outright (SIGKILL, a lost node) cannot remove its sibling, so
the next write to the same target removes the siblings of processes of this host that no longer
run: the name says whose they are. A run directory is swapped in with one atomic exchange where
the system has one (Linux ``renameat2``); elsewhere the previous directory is set aside as
``.NAME.HOST-PID.old`` for the instant between two renames, and a later write puts it back if
the writer died in that instant.
"""

from __future__ import annotations

import ctypes
import errno
import glob
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

TMP_SUFFIX = ".tmp"
OLD_SUFFIX = ".old"


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` on a temporary sibling, then rename it over ``path``.

    The rename is atomic on POSIX file systems, so readers see the old file or
    the complete new one. The temporary file is removed if ``write`` fails.
    A symbolic link is written through: its target is replaced, the link kept
    (a dangling link's target is created, with its folders). A device or a named
    pipe (``/dev/null``, ``/dev/stdout``, a FIFO, also behind links) is written
    into directly: renaming over it would replace the device with a file (an
    audit, as root, turned ``/dev/null`` into a CSV), and a stream has no old
    content to keep.
    """
    given = Path(path)
    streams = given.exists() and not given.is_file() and not given.is_dir()  # through any links: /dev/stdout -> pipe
    if streams or given.absolute().parts[1:2] in (("dev",), ("proc",)):  # /dev/stdout >> log.csv: append, not replace
        write(given)
        return given
    if given.is_dir():  # os.replace would fail only after the work, naming the temporary file
        raise IsADirectoryError(errno.EISDIR, "is a folder, not a file", str(given))
    target = _link_target(given) if given.is_symlink() else given
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(target, directory=False)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; outputs get the usual permissions
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def _link_target(link: Path) -> Path:
    """The file a symbolic link ends at (to be created when it dangles); OSError for a loop of links."""
    try:
        return Path(os.path.realpath(link, strict=True))
    except FileNotFoundError:
        return Path(os.path.realpath(link))
    except OSError as exc:
        raise OSError(exc.errno, f"a symbolic link that never reaches a file ({exc.strerror})", str(link)) from None


def write_text(path: str | Path, text: str) -> Path:
    """Write text atomically (UTF-8)."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def folder_problem(option: str, path: str | Path) -> str | None:
    """Why nothing can be created at ``path``: its nearest existing folder is a file or cannot be
    written (None when it can). ``option`` names the command-line option in the message."""
    parent = Path(path).parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"{option} {path}: {parent} is a file, not a folder"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{option} {path}: cannot write in {parent} (not a writable folder)"
    return None


def file_problem(option: str, path: str | Path) -> str | None:
    """Why the file ``path`` cannot be written (a folder, in an unwritable folder, read-only), or None."""
    target = Path(path)
    if target.is_dir():
        return f"{option} {path}: is a folder; give a file name"
    problem = folder_problem(option, path)
    if problem is None and target.exists() and not os.access(target, os.W_OK):
        return f"{option} {path}: the file exists and is read-only"
    return problem


# the files of a fit's run directory (SPEC §5) that other commands read: never an output of theirs
RUN_DIRECTORY_FILES = ("posterior.nc", "summary.csv", "predictions.csv", "exposure.csv", "run.json", "model.toml")


def _same(a: Path, b: Path) -> bool:
    """One file under two names (symlinks and hard links too)."""
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def clash_problems(outputs: Mapping[str, str | Path | None], inputs: Mapping[str, str | Path | None] | None = None) -> list[str]:
    """Outputs that would overwrite what the command reads or writes besides: an input (``inputs``
    maps a description, e.g. "the dataset", to its path), another output, or a file of a fit's run
    directory. ``outputs`` maps an option (``--out``) to its path; None or "" is not given.

    Checked before any work, because the atomic rename would otherwise replace the input for good.
    """
    given = {option: Path(path) for option, path in outputs.items() if path is not None and str(path) != ""}
    sources = {what: Path(path) for what, path in (inputs or {}).items() if path is not None and str(path) != ""}
    problems = []
    options = list(given)
    for k, option in enumerate(options):
        path = given[option]
        same_input = next((what for what, source in sources.items() if _same(path, source)), None)
        same_output = next((other for other in options[:k] if _same(path, given[other])), None)
        if same_input:
            problems.append(f"{option} {path}: is {same_input}, which this command uses; give another file name")
        elif same_output:
            problems.append(f"{option} {path}: is also {same_output}; give each output its own file")
        elif path.name in RUN_DIRECTORY_FILES and (path.parent / "run.json").is_file():
            problems.append(f"{option} {path}: is a file of the run directory {path.parent}; write it elsewhere")
    return problems


def temporary_sibling(target: Path, *, directory: bool) -> Path:
    """A new, empty hidden sibling of ``target`` owned by this process (a folder or a file).

    Siblings left by dead processes of this host are removed first (:func:`remove_stale`).
    """
    remove_stale(target)
    prefix = f".{target.name}.{_owner()}."
    if directory:
        return Path(tempfile.mkdtemp(prefix=prefix, suffix=TMP_SUFFIX, dir=target.parent))
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=TMP_SUFFIX, dir=target.parent)
    os.close(fd)
    return Path(name)


def replace_directory(new: Path, target: Path) -> None:
    """Put the folder ``new`` at ``target``, replacing the folder there (if any) in one step.

    Readers see the previous folder or the new one, never neither, where the file system can
    exchange two names atomically; elsewhere the previous folder is renamed aside for the instant
    between two renames (and restored by the next write if this process dies there).
    """
    if not target.exists():
        os.replace(new, target)
        return
    if _exchange(new, target):
        shutil.rmtree(new, ignore_errors=True)  # ``new`` now names the previous folder
        return
    old = target.with_name(f".{target.name}.{_owner()}{OLD_SUFFIX}")
    os.replace(target, old)
    try:
        os.replace(new, target)
    except BaseException:  # the previous folder goes back (a kill here is repaired by the next write)
        os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def remove_stale(target: Path) -> None:
    """Remove the temporary siblings of ``target`` left by processes of this host that have ended.

    A set-aside previous folder (``.NAME.HOST-PID.old``) whose writer died before the new one
    was in place is put back at ``target`` instead. Siblings of live processes, of other hosts
    (a shared cluster file system) or named another way are left alone.
    """
    if not target.parent.is_dir():
        return
    for sibling in target.parent.glob(f".{glob.escape(target.name)}.*"):
        owner = _sibling_owner(sibling.name, target.name)
        if owner is None or _alive(owner):
            continue
        if sibling.name.endswith(OLD_SUFFIX) and not target.exists():
            os.replace(sibling, target)
        elif sibling.is_dir() and not sibling.is_symlink():
            shutil.rmtree(sibling, ignore_errors=True)
        else:
            sibling.unlink(missing_ok=True)


def _owner() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def _sibling_owner(name: str, target_name: str) -> int | None:
    """The PID in ``.TARGET.HOST-PID.XXXX.tmp`` or ``.TARGET.HOST-PID.old`` when HOST is this host."""
    middle = name[len(target_name) + 2:]
    if middle.endswith(TMP_SUFFIX):
        middle = middle[: -len(TMP_SUFFIX)].rpartition(".")[0]  # drop tempfile's random part
    elif middle.endswith(OLD_SUFFIX):
        middle = middle[: -len(OLD_SUFFIX)]
    else:
        return None
    host, _, pid = middle.rpartition("-")
    return int(pid) if host == socket.gethostname() and pid.isdigit() else None


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: alive
        return True
    return True


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap the names ``a`` and ``b`` atomically (Linux renameat2); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):  # not glibc >= 2.28 (macOS, musl, Windows)
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):  # kernel or file system without it
        return False
    raise OSError(code, os.strerror(code), str(b))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
