"""Signals: SIGINT and SIGTERM end a run with one line, status 130 or 143, and the temporary folder
removed; what SIGKILL leaves is removed by the next run to the same output, with a note."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from cli_helpers import assert_one_line, cli, cli_command, dead_pid
from omnicache_export import outputs
from omnicache_export.cli import failures

pytestmark = pytest.mark.filterwarnings("ignore")
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGKILL)


def _writing(folder) -> bool:
    """A temporary output folder of ours under `folder` that already holds a file."""
    for entry in folder.glob(".out.omnicache-tmp-*"):
        try:
            if any(entry.iterdir()):
                return True
        except OSError:  # removed meanwhile
            continue
    return False


@pytest.fixture(scope="module")
def signalled(zoo_export, tmp_path_factory):
    """Three main jobs started at once, each sent its signal once its temporary folder holds a file:
    {signal: (its working folder, exit status, stderr)}."""
    model = zoo_export("dit", "torchscript")
    base = tmp_path_factory.mktemp("signals")
    procs = {}
    for sig in SIGNALS:
        cwd = base / sig.name
        cwd.mkdir()
        procs[sig] = cwd, subprocess.Popen(cli_command(model, "-o", "out", "--steps", "50", "-q"), cwd=cwd,
                                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    waiting, deadline = set(SIGNALS), time.monotonic() + 240
    while waiting and time.monotonic() < deadline:
        for sig in list(waiting):
            cwd, proc = procs[sig]
            if proc.poll() is not None:
                waiting.discard(sig)  # ended before writing: its test fails on the status
            elif _writing(cwd):
                proc.send_signal(sig)
                waiting.discard(sig)
        time.sleep(0.01)
    results = {}
    for sig, (cwd, proc) in procs.items():
        if sig in waiting:
            proc.kill()
        _, err = proc.communicate(timeout=120)
        results[sig] = cwd, proc.returncode, err
    return results


@pytest.mark.parametrize("sig,status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_interrupt_one_line_status_and_temporary_folder_removed(signalled, sig, status):
    cwd, rc, err = signalled[sig]
    assert rc == status, err
    assert_one_line(err, f"interrupted by {sig.name}")
    assert os.listdir(cwd) == []


def test_sigkill_leftover_is_removed_by_the_next_run_with_a_note(signalled, zoo_export, capsys):
    cwd, rc, err = signalled[signal.SIGKILL]
    assert rc == -signal.SIGKILL, err
    stale = os.listdir(cwd)
    assert len(stale) == 1 and stale[0].startswith(".out.omnicache-tmp-"), stale
    pid = int(stale[0].split("-")[-2])
    rc, _, err = cli(capsys, "split", zoo_export("dit", "torchscript"), "-o", cwd / "out", "--no-verify")
    assert rc == 0
    assert f"omnicache-export: warning: removed {cwd / stale[0]}, left by a killed run (pid {pid})" in err
    assert os.listdir(cwd) == ["out"]


@pytest.mark.parametrize("sig,status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_interrupt_in_process_while_writing(sig, status, zoo_export, tmp_path, capsys, monkeypatch):
    """The same, deterministic: the signal arrives right after the graphs are written."""
    import omnicache_export.graph.split as split_job

    write_graphs = split_job.write_graphs

    def interrupted(*args, **kwargs):
        write_graphs(*args, **kwargs)
        assert signal.getsignal(sig) is failures._raise_interrupted  # never signal pytest itself
        os.kill(os.getpid(), sig)
        time.sleep(10)  # the handler raises first

    monkeypatch.setattr(split_job, "write_graphs", interrupted)
    rc, _, err = cli(capsys, "split", zoo_export("dit", "torchscript"), "-o", tmp_path / "a" / "out", "--no-verify")
    assert rc == status
    assert_one_line(err, f"interrupted by {sig.name}")
    assert os.listdir(tmp_path) == []  # the temporary folder and the parent it created
    assert signal.getsignal(sig) is not failures._raise_interrupted  # handlers restored


def test_stale_cleanup_spares_live_runs_and_other_names(tmp_path):
    out = tmp_path / "out"
    dead = tmp_path / f".out.omnicache-tmp-{dead_pid()}-0123abcd"
    dead.mkdir()
    (dead / "full.onnx").write_text("half\n")
    spared = [tmp_path / f".out.omnicache-tmp-{os.getpid()}-0123abcd",  # a live run's
              tmp_path / f".other.omnicache-tmp-{dead_pid()}-0123abcd",  # beside another output
              tmp_path / ".out.backup",  # the user's
              tmp_path / f".out.omnicache-tmp-{dead_pid()}-not-ours"]  # not our pattern
    for path in spared:
        path.mkdir()
    notes = outputs.clean_stale(out)
    assert notes == [f"removed {dead}, left by a killed run (pid {dead.name.split('-')[-2]})"]
    assert not dead.exists() and all(p.exists() for p in spared) and not out.exists()
