"""Writing outputs safely: checked before any work, built under a temporary name, renamed at the end.

Every output (the main job's and the split job's folders, `example`'s model files, `run`'s result)
is written into a temporary folder beside it, `.NAME.omnicache-tmp-<pid>-<rand>`, created with the
user's umask. The folder becomes the output only when the work succeeded; on any failure, a signal
included, it is removed. Runs killed outright (SIGKILL, power loss) leave it behind: the next run to
the same output removes the ones whose owner process is gone, with a note.

The final rename never replaces what another run wrote meanwhile: `renameat2(RENAME_NOREPLACE)`
(Linux >= 3.15, on ext4, xfs, btrfs, tmpfs, ...) fails if the target appeared, atomically. Where the
call or the file system lacks it, the fallback checks first and then renames: a folder rename can then
only replace an *empty* folder created in between (the kernel refuses a non-empty one), and files are
moved by `link` + `unlink`, which fails on an existing target. A lock file beside the output was the
other way: it needs every writer to take it, and a killed run leaves it behind to be broken.

`--force` replaces only an earlier export (a folder holding `omnicache.json` or `split.json` and only
files the tool writes) or an empty folder, never a folder holding an input or files of the user's.
The replacement is one `renameat2(RENAME_EXCHANGE)` where available (the output is never missing),
else two renames through `.NAME.omnicache-old-<pid>-<rand>`; a run killed between those two leaves
the earlier export there, and the next run to the output moves it back.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import re
import secrets
import shutil
import signal
from collections.abc import Iterable, Iterator
from pathlib import Path

from omnicache_export.errors import UserError

logger = logging.getLogger(__name__)

TEMP_TAG = "omnicache-tmp"  # a folder being written
OLD_TAG = "omnicache-old"  # an earlier export moved aside while --force replaces it (fallback only)
_OURS = re.compile(r"^\.(?P<name>.+)\.(?P<tag>omnicache-tmp|omnicache-old)-(?P<pid>\d+)-[0-9a-f]{8}$")

REPOSITORY_MARKER = "omnicache_repository.json"  # a Triton repository triton-repo wrote: the models it holds
MARKERS = ("omnicache.json", "split.json", REPOSITORY_MARKER)  # what an earlier output of each job holds
# Everything the main and the split job write into their folder (the manifest's artifacts besides).
WRITTEN = {"omnicache.json", "split.json", "report.html", "full.onnx", "full.onnx.data", "cache.onnx",
           "cache.onnx.data",
           "tensorrt"}  # build_engines.sh's plans and timing cache (its own folder, made on the target)

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP}


def _load_renameat2():
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # not Linux, or glibc < 2.28
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_renameat2 = _load_renameat2()


def _renameat2_call(src: Path, dst: Path, flags: int) -> bool:
    """True if done; False if the kernel or the file system lacks the flag; OSError otherwise."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in _UNSUPPORTED:
        return False
    raise OSError(err, os.strerror(err), str(src), None, str(dst))


def rename_noreplace(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Rename `src` to `dst`, failing with FileExistsError if `dst` exists (see the module doc)."""
    src, dst = Path(src), Path(dst)
    if _renameat2_call(src, dst, _RENAME_NOREPLACE):
        return
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(src), None, str(dst))
    if src.is_dir() and not src.is_symlink():
        os.rename(src, dst)  # onto a folder created in between: only an empty one, nothing lost
        return
    try:
        os.link(src, dst)  # fails on an existing target
    except (PermissionError, NotImplementedError) as exc:  # no hard links here: the checked rename
        logger.debug("no hard links (%s): plain rename", exc)
        os.rename(src, dst)
        return
    os.unlink(src)


def _exchange(a: Path, b: Path) -> bool:
    return _renameat2_call(a, b, _RENAME_EXCHANGE)


# --- temporary names, stale ones -------------------------------------------------------------------


def temp_path(target: Path, tag: str = TEMP_TAG) -> Path:
    """`.NAME.<tag>-<pid>-<rand>` beside `target`: recognisable as ours, its owner known."""
    return target.parent / f".{target.name}.{tag}-{os.getpid()}-{secrets.token_hex(4)}"


def _make_temp_dir(target: Path) -> Path:
    while True:
        path = temp_path(target)
        try:
            os.mkdir(path, 0o777)  # the kernel applies the umask (mkdtemp would make it 0700)
            return path
        except FileExistsError:
            continue


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def clean_stale(target: str | os.PathLike) -> list[str]:
    """Remove the temporary folders that killed runs left beside `target` (owner pid gone); move an
    earlier export back where a run was killed between the two renames of a --force replacement.
    Returns the notes (also logged as warnings)."""
    target = Path(target)
    notes: list[str] = []
    try:
        entries = sorted(os.listdir(target.parent))
    except OSError:
        return notes
    for name in entries:
        m = _OURS.match(name)
        if m is None or m["name"] != target.name or _pid_alive(int(m["pid"])):
            continue
        path = target.parent / name
        try:
            if m["tag"] == OLD_TAG and not os.path.lexists(target):
                os.rename(path, target)
                notes.append(f"moved {path} back to {target}: a run (pid {m['pid']}) was killed while replacing it")
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
            notes.append(f"removed {path}, left by a killed run (pid {m['pid']})")
        except OSError as exc:
            notes.append(f"could not remove {path}, left by a killed run (pid {m['pid']}): {exc.strerror}")
    for note in notes:
        logger.warning(note)
    return notes


# --- checks before any work ------------------------------------------------------------------------


def _resolved(path: Path) -> Path:
    return Path(os.path.realpath(path))


def _inputs(inputs: Iterable) -> list[tuple[Path, Path]]:
    return [(Path(p), _resolved(Path(p))) for p in inputs if p is not None]


def _earlier_export_problem(out: Path, given: Path | None = None) -> str | None:
    """None where --force may replace `out`: empty, or an earlier export holding only what the tool writes.
    `given`: `out` as the user wrote it, for the message."""
    entries = sorted(os.listdir(out))
    name = out if given is None else given
    if not entries:
        return None
    head = "--force replaces only an earlier export or an empty folder"
    if not set(MARKERS) & set(entries):
        shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
        return f"{head}: {name} holds no omnicache.json or split.json ({shown})"
    known = set(WRITTEN) | {REPOSITORY_MARKER}
    try:  # the manifest's artifacts are the tool's files too (read raw: only their names matter)
        artifacts = json.loads((out / "omnicache.json").read_text()).get("artifacts", {})
        known |= {Path(key).parts[0] for key in artifacts if isinstance(key, str) and Path(key).parts}
    except (OSError, ValueError, AttributeError):
        pass
    try:  # a repository's model folders, as its marker lists them
        models = json.loads((out / REPOSITORY_MARKER).read_text()).get("models", [])
        known |= {m for m in models if isinstance(m, str) and m and Path(m).name == m}
    except (OSError, ValueError, AttributeError):
        pass
    foreign = [e for e in entries if e not in known]
    if foreign:
        shown = ", ".join(foreign[:4]) + (", ..." if len(foreign) > 4 else "")
        return f"{head}: {name} holds files omnicache-export did not write ({shown})"
    return None


def _common_problem(out: Path, inputs: Iterable, kind: str) -> str | None:
    real = _resolved(out)
    if real.parent == real:
        return f"{out}: the filesystem root cannot be an output {kind}"
    cwd = _resolved(Path.cwd())
    if real == cwd or real in cwd.parents:
        return f"{out} {'is' if real == cwd else 'holds'} the current folder: give a new {kind} name"
    for given, path in _inputs(inputs):
        if real == path:
            return f"{out} is the input {given}: give another {kind} name"
        if real in path.parents:
            return f"{out} holds the input {given}: refusing to write over it; give another {kind} name"
        if path in real.parents and path.is_dir():
            return f"{out} is inside the input folder {given}: write it elsewhere"
    if os.path.islink(out):
        return f"{out} is a symbolic link: give the {kind} itself"
    return None


def _probe(out: Path) -> None:
    """Refuse an output we could not create, before any work: try a temporary folder where it would go."""
    parent = out.parent
    while not parent.exists():
        if parent.parent == parent:
            break
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{out}: {parent} is not a folder")
    probe = temp_path(parent / (_resolved(out).name or "output"))
    try:
        os.mkdir(probe, 0o700)
        os.rmdir(probe)
    except OSError as exc:
        raise UserError(f"{out}: cannot write in {parent}: {exc.strerror}") from None


def check_output_dir(out: str | os.PathLike, force: bool = False, inputs: Iterable = (), probe: bool = True) -> None:
    """Everything that would refuse output folder `out`, checked before any work (UserError)."""
    out = Path(out)
    problem = _common_problem(out, inputs, "folder")
    if problem is None:
        real = _resolved(out)  # not a symbolic link: only `.` and `..` inside it change
        clean_stale(real)
        if os.path.lexists(real):
            if not real.is_dir():
                problem = f"{out} is a file, not a folder: give a new folder name"
            elif not force:
                problem = f"{out} already exists (pass --force to replace an earlier export)"
            else:
                problem = _earlier_export_problem(real, out)
    if problem:
        raise UserError(problem)
    if probe:
        _probe(out)


def check_output_file(out: str | os.PathLike, force: bool = False, inputs: Iterable = (), probe: bool = True) -> None:
    """Everything that would refuse output file `out`, checked before any work (UserError)."""
    out = Path(out)
    if out.is_dir():
        raise UserError(f"{out}: is a directory (give a file name)")
    problem = _common_problem(out, inputs, "file")
    if problem is None:
        clean_stale(_resolved(out))
        if os.path.lexists(out):
            if not force:
                problem = f"{out} already exists (pass --force to replace it)"
            elif not out.is_file():
                problem = f"{out} is not a regular file: refusing to replace it"
    if problem:
        raise UserError(problem)
    if probe:
        _probe(out)


# --- writing ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """SIGINT and SIGTERM wait while the renames run: an interrupt lands before them or after."""
    blockable = hasattr(signal, "pthread_sigmask")
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM}) if blockable else None
    try:
        yield
    finally:
        if blockable:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _make_parents(folder: Path) -> list[Path]:
    """mkdir -p, returning the folders it created (to remove again on failure)."""
    missing = []
    while not os.path.lexists(folder) and folder.parent != folder:
        missing.append(folder)
        folder = folder.parent
    created: list[Path] = []
    try:
        for path in reversed(missing):
            try:
                os.mkdir(path, 0o777)
            except FileExistsError:
                continue
            created.append(path)
    except BaseException:
        _remove_empty(created)
        raise
    return created


def _make_temp_beside(target: Path) -> tuple[Path, list[Path]]:
    """The parents `target` lacks, then its temporary folder: (the folder, the parents created)."""
    created = _make_parents(target.parent)
    try:
        return _make_temp_dir(target), created
    except BaseException:
        _remove_empty(created)
        raise


def _remove_empty(folders: list[Path]) -> None:
    for folder in reversed(folders):
        try:
            os.rmdir(folder)
        except OSError:
            break


def _appeared(out: Path) -> UserError:
    return UserError(f"{out} appeared while this run worked (another run writing the same output?): "
                     "not replacing it; this run's result is discarded")


def _commit_dir(tmp: Path, out: Path, force: bool, inputs: Iterable) -> Path | None:
    """Rename `tmp` to `out`; returns the path now holding a replaced earlier export (to remove)."""
    if not force or not os.path.lexists(out):
        try:
            rename_noreplace(tmp, out)
        except FileExistsError:
            raise _appeared(out) from None
        return None
    problem = _common_problem(out, inputs, "folder") or (
        f"{out} is a file, not a folder" if not out.is_dir() else _earlier_export_problem(out))
    if problem:  # it changed while this run worked
        raise UserError(problem)
    if _exchange(tmp, out):
        return tmp
    old = temp_path(out, OLD_TAG)
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException as exc:
        try:
            os.rename(old, out)
        except OSError:
            raise UserError(f"could not replace {out} ({exc}); the earlier export is kept at {old}: "
                            f"rename it back to {out.name}") from exc
        raise
    return old


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike, force: bool = False, inputs: Iterable = ()) -> Iterator[Path]:
    """Yield a temporary folder beside `out` that becomes `out` only if the block finishes without
    error; removed on any failure. `inputs`: paths `out` must neither be nor hold."""
    out = Path(out)
    inputs = list(inputs)
    check_output_dir(out, force, inputs, probe=False)
    out = _resolved(out)  # checked: not a symbolic link
    tmp, created = _make_temp_beside(out)
    try:
        yield tmp
        with _signals_deferred():
            old = _commit_dir(tmp, out, force, inputs)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(created)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _commit_files(tmp: Path, parent: Path, force: bool) -> None:
    moved: list[Path] = []
    for name in sorted(os.listdir(tmp)):
        dst = parent / name
        if force:
            os.replace(tmp / name, dst)
            continue
        try:
            rename_noreplace(tmp / name, dst)
        except FileExistsError:
            for path in moved:  # new files only (no-replace): take them back
                path.unlink(missing_ok=True)
            raise _appeared(dst) from None
        moved.append(dst)


@contextlib.contextmanager
def atomic_output_files(*targets: str | os.PathLike, force: bool = False, inputs: Iterable = ()) -> Iterator[Path]:
    """Yield a temporary folder beside the first target; the block writes its files there under their
    final names (some of `targets`, all in one folder). At the end each is renamed into place, never
    replacing an existing file unless `force`; on any failure the folder is removed."""
    paths = [Path(t) for t in targets]
    inputs = list(inputs)
    if len({_resolved(p.parent) for p in paths}) != 1:
        raise ValueError("atomic_output_files: the targets must share one folder")
    for path in paths:
        check_output_file(path, force, inputs, probe=False)
    first = _resolved(paths[0])  # checked: not a symbolic link
    parent = first.parent
    tmp, created = _make_temp_beside(first)
    try:
        yield tmp
        with _signals_deferred():
            _commit_files(tmp, parent, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(created)
        raise
    shutil.rmtree(tmp, ignore_errors=True)
