"""What the bad-input tests of the CLI share: running it, the one-line check, leftovers, snapshots."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import subprocess
import sys
from pathlib import Path

from omnicache_export.cli.main import main

PREFIX = "omnicache-export: error: "
OURS = (".omnicache-tmp-", ".omnicache-old-")


def cli(capsys, *argv) -> tuple[int, str, str]:
    """Run the CLI in-process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line(err: str, *fragments: str) -> None:
    """Exactly one line on stderr, the error line, no traceback, holding every fragment."""
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert err.startswith(PREFIX) and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


def leftovers(*folders: Path) -> list[str]:
    """Temporary or moved-aside folders of ours anywhere under `folders`."""
    found = []
    for folder in folders:
        for root, dirs, files in os.walk(folder):
            found += [os.path.join(root, n) for n in dirs + files if any(tag in n for tag in OURS)]
    return found


def snapshot(folder: Path) -> dict[str, tuple[int, str]]:
    """Every entry under `folder` (itself included): mode and content hash."""
    snap = {".": (os.stat(folder).st_mode, "")}
    for path in sorted(Path(folder).rglob("*")):
        data = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""
        snap[str(path.relative_to(folder))] = (path.stat().st_mode, data)
    return snap


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@contextlib.contextmanager
def unprivileged():
    """Permission bits apply (root ignores them): as root, run the block with euid/egid nobody."""
    if os.geteuid() != 0:
        yield
        return
    os.setegid(65534)
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


@contextlib.contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def cli_command(*argv) -> list[str]:
    return [sys.executable, "-m", "omnicache_export.cli", *[str(a) for a in argv]]


_EXPORTS: dict[str, Path] = {}


def dit_export(zoo_export, tmp_path_factory) -> Path:
    """The tiny DiT through the main job (4 steps, synthesized conditioning), made once per session."""
    if "dit" not in _EXPORTS:
        out = tmp_path_factory.mktemp("badinput-dit") / "export"
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            rc = main([str(zoo_export("dit", "torchscript")), "-o", str(out), "--steps", "4", "--num-calib", "2", "-q"])
        assert rc == 0
        _EXPORTS["dit"] = out
    return _EXPORTS["dit"]
