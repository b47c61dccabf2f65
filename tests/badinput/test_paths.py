"""Output paths: what --force may replace, odd -o values, read-only folders, two runs to one output,
a run killed between the renames, full disks, atomic writes of every verb, the user's umask.

Each case: the exit status, one line on stderr without a traceback, inputs intact, nothing left."""

from __future__ import annotations

import errno
import os
import resource
import shutil
import signal
import stat
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest

from cli_helpers import (assert_one_line, cli, cli_command, dead_pid, dit_export, leftovers, snapshot, umask,
                         unprivileged)
from omnicache_export import outputs

pytestmark = pytest.mark.filterwarnings("ignore")
SPLIT = ("--no-verify", "-q")


@pytest.fixture
def model(zoo_export, tmp_path):
    """The tiny DiT in a folder of the user's, beside a file of theirs."""
    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copy(zoo_export("dit", "torchscript"), folder / "model.onnx")
    (folder / "notes.txt").write_text("mine\n")
    return folder / "model.onnx"


@pytest.fixture
def exported(zoo_export, tmp_path_factory):
    return dit_export(zoo_export, tmp_path_factory)


def forbid_work(monkeypatch):
    """Loading a model or an export, or building one, fails the test: refusals must come first."""
    from omnicache_export.graph import modelio
    from omnicache_export.runtime.omnicache import OmniCache
    from omnicache_export.zoo import export, reference

    def work(*args, **kwargs):
        raise AssertionError("work started before the output was checked")

    for owner, name in ((modelio, "load_model"), (modelio, "load_user_model"), (export, "export_family"),
                        (reference, "export_reference")):
        monkeypatch.setattr(owner, name, work)
    monkeypatch.setattr(OmniCache, "load", classmethod(work))


def test_force_never_replaces_the_folder_holding_the_input_model(model, capsys, monkeypatch):
    before = snapshot(model.parent)
    forbid_work(monkeypatch)
    for verb in ("export", "split"):
        rc, _, err = cli(capsys, verb, model, "-o", model.parent, "--force")
        assert rc == 2
        assert_one_line(err, "holds the input", "model.onnx")
    assert snapshot(model.parent) == before and not leftovers(model.parent.parent)


@pytest.mark.parametrize("case", ["user_folder", "export_and_user_file"])
def test_force_replaces_only_earlier_exports(case, model, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    if case == "user_folder":
        out.mkdir()
        (out / "data.csv").write_text("1,2\n")
        message = "holds no omnicache.json"
    else:
        assert cli(capsys, "split", model, "-o", out, *SPLIT)[0] == 0
        (out / "notes.txt").write_text("mine\n")
        message = "did not write (notes.txt)"
    before = snapshot(out)
    forbid_work(monkeypatch)
    for verb in ("export", "split"):
        rc, _, err = cli(capsys, verb, model, "-o", out, "--force")
        assert rc == 2
        assert_one_line(err, "--force replaces only an earlier export or an empty folder", message)
    assert snapshot(out) == before and not leftovers(tmp_path)


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "two-renames"])
def test_force_replaces_an_empty_folder_or_an_earlier_export_leaving_nothing(exchange, model, tmp_path, capsys,
                                                                             monkeypatch):
    if not exchange:
        monkeypatch.setattr(outputs, "_exchange", lambda a, b: False)
    out = tmp_path / "out"
    out.mkdir()
    for _ in range(2):  # the empty folder, then the earlier export
        assert cli(capsys, "split", model, "-o", out, "--force", *SPLIT)[0] == 0
        assert sorted(os.listdir(out)) == ["cache.onnx", "full.onnx", "split.json"]
        assert not leftovers(tmp_path) and sorted(os.listdir(tmp_path)) == ["models", "out"]


@pytest.mark.parametrize("target,force,message", [
    (".", True, "is the current folder"),
    ("..", True, "holds the current folder"),
    ("/", True, "the filesystem root cannot be an output folder"),
    ("file", False, "file is a file, not a folder"),
    ("file", True, "file is a file, not a folder"),
    ("link", True, "is a symbolic link"),
])
@pytest.mark.parametrize("verb", ["export", "split"])
def test_odd_output_folders_are_refused_before_any_work(verb, target, force, message, model, tmp_path, capsys,
                                                         monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "file").write_text("keep\n")
    (work / "link").symlink_to(work / "file")
    monkeypatch.chdir(work)
    forbid_work(monkeypatch)
    root = set(os.listdir("/"))
    rc, _, err = cli(capsys, verb, model, "-o", target, *(["--force"] if force else []))
    assert rc == 2
    assert_one_line(err, message)
    assert (work / "file").read_text() == "keep\n" and sorted(os.listdir(work)) == ["file", "link"]
    assert not leftovers(tmp_path) and set(os.listdir("/")) == root


@pytest.fixture
def open_tree(zoo_export, exported):
    """A tree others may read (the test drops root's privileges): a model, an export, a read-only folder."""
    base = Path(tempfile.mkdtemp(prefix="omnicache-badinput-"))
    base.chmod(0o755)
    (base / "models").mkdir(mode=0o755)
    shutil.copy(zoo_export("dit", "torchscript"), base / "models" / "model.onnx")
    shutil.copytree(exported, base / "export")
    np.savez(base / "in.npz", class_labels=np.array([1, 2], np.int64))
    for path in (base / "models" / "model.onnx", base / "in.npz"):
        path.chmod(0o644)
    (base / "export").chmod(0o755)
    (base / "ro").mkdir(mode=0o555)
    (base / "ro").chmod(0o555)
    yield base
    (base / "ro").chmod(0o755)
    shutil.rmtree(base)


def test_read_only_folder_is_refused_before_any_work(open_tree, capsys, monkeypatch):
    forbid_work(monkeypatch)
    model, ro = open_tree / "models" / "model.onnx", open_tree / "ro"
    cases = [
        (model, "-o", ro / "out"),
        ("split", model, "-o", ro / "out"),
        ("inspect", model, "-o", ro / "a.json"),
        ("example", "dit", "-o", ro / "dit.onnx"),
        ("run", open_tree / "export", "--inputs", open_tree / "in.npz", "-o", ro / "r.npz"),
        ("split", model, "-o", ro / "new" / "deeper"),  # folders to create inside a read-only one
    ]
    for argv in cases:
        with unprivileged():
            rc, _, err = cli(capsys, *argv)
        assert rc == 2, argv
        assert_one_line(err, "cannot write in", str(ro), "Permission denied")
        assert os.listdir(ro) == []


def test_run_output_folder_or_input_is_refused_before_sampling(exported, tmp_path, capsys, monkeypatch):
    inputs = tmp_path / "in.npz"
    np.savez(inputs, class_labels=np.array([1, 2], np.int64))
    folder = tmp_path / "results"
    folder.mkdir()
    before = snapshot(exported)
    forbid_work(monkeypatch)
    cases = [
        (("-o", folder), "is a directory"),
        (("--out", folder, "--force"), "is a directory"),
        (("-o", inputs, "--force"), "is the input"),
        (("-o", exported / "result.npz"), "inside the input folder"),
        (("-o", exported / "omnicache.json", "--force"), "inside the input folder"),
    ]
    for extra, message in cases:
        rc, _, err = cli(capsys, "run", exported, "--inputs", inputs, *extra)
        assert rc == 2, extra
        assert_one_line(err, message)
    assert snapshot(exported) == before and os.listdir(folder) == [] and not leftovers(tmp_path)
    assert np.load(inputs)["class_labels"].tolist() == [1, 2]


@pytest.mark.parametrize("renameat2", [True, False], ids=["renameat2-noreplace", "checked-rename"])
def test_second_run_to_one_output_fails_at_the_rename(renameat2, model, tmp_path, capsys, monkeypatch):
    """Two runs to one folder: the one finishing second fails instead of replacing the first's work
    (here the first finishes while the second writes its graphs)."""
    import omnicache_export.graph.split as split_job

    if not renameat2:
        monkeypatch.setattr(outputs, "_renameat2", None)
    out = tmp_path / "out"
    write_graphs = split_job.write_graphs

    def racing(*args, **kwargs):
        write_graphs(*args, **kwargs)
        out.mkdir()
        (out / "omnicache.json").write_text("{}\n")

    monkeypatch.setattr(split_job, "write_graphs", racing)
    rc, _, err = cli(capsys, "split", model, "-o", out, *SPLIT)
    assert rc == 2
    assert_one_line(err, f"{out} appeared while this run worked", "not replacing it")
    assert os.listdir(out) == ["omnicache.json"] and not leftovers(tmp_path)


def test_rename_never_replaces_even_an_empty_folder(tmp_path, monkeypatch):
    for native in (True, False):
        if not native:
            monkeypatch.setattr(outputs, "_renameat2", None)
        src, dst = tmp_path / "src", tmp_path / "dst"
        src.mkdir(exist_ok=True)
        (src / "x").write_text("new\n")
        dst.mkdir(exist_ok=True)
        with pytest.raises(FileExistsError):
            outputs.rename_noreplace(src, dst)
        (tmp_path / "a").write_text("a\n")
        (tmp_path / "b").write_text("b\n")
        with pytest.raises(FileExistsError):
            outputs.rename_noreplace(tmp_path / "a", tmp_path / "b")
        assert (src / "x").read_text() == "new\n" and (tmp_path / "b").read_text() == "b\n"


def test_killed_between_the_two_renames_the_next_run_moves_the_export_back(model, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli(capsys, "split", model, "-o", out, *SPLIT)[0] == 0
    before = snapshot(out)
    pid = dead_pid()
    aside = tmp_path / f".out.omnicache-old-{pid}-0123abcd"
    out.rename(aside)  # what --force leaves where it is killed between moving OUT aside and renaming the new one
    rc, _, err = cli(capsys, "split", model, "-o", out, "--no-verify")
    assert rc == 2
    note, error = err.splitlines()
    assert note == f"omnicache-export: warning: moved {aside} back to {out}: a run (pid {pid}) was killed while replacing it"
    assert error.startswith("omnicache-export: error: ") and "already exists" in error
    assert snapshot(out) == before and not leftovers(tmp_path)


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_created_folders_and_files_honour_the_umask(mask, model, tmp_path, capsys):
    out = tmp_path / "a" / "b" / "out"
    with umask(mask):
        assert cli(capsys, "split", model, "-o", out, *SPLIT)[0] == 0
    for folder in (tmp_path / "a", tmp_path / "a" / "b", out):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~mask, folder
    for path in out.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask, path


def _limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit raise EFBIG instead of killing
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))


def test_full_disk_main_job_one_line_nothing_left(model, tmp_path):
    """A full disk, as RLIMIT_FSIZE makes it (EFBIG, handled as ENOSPC), in a subprocess."""
    before = snapshot(model.parent)
    proc = subprocess.run(cli_command(model, "-o", tmp_path / "deep" / "out", "--steps", "4", "-q"),
                          preexec_fn=_limit_file_size, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert_one_line(proc.stderr, "writing", "nothing was kept")
    assert sorted(os.listdir(tmp_path)) == ["models"] and not leftovers(tmp_path)
    assert snapshot(model.parent) == before


def _disk_full_after(nbytes: int):
    """A writer that writes `nbytes`, then fails like a full disk."""

    def write(*args, **kwargs):  # numpy.savez(file, ...), onnx.save(proto, path, ...)
        target = next(a for a in args if hasattr(a, "write") or isinstance(a, (str, os.PathLike)))
        if hasattr(target, "write"):
            target.write(b"\0" * nbytes)
        else:
            Path(target).write_bytes(b"\0" * nbytes)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    return write


def test_example_writes_atomically(tmp_path, capsys, monkeypatch):
    import onnx

    target = tmp_path / "models" / "dit.onnx"
    with umask(0o027):
        rc, out, err = cli(capsys, "example", "dit", "-o", target)
    assert rc == 0 and err == ""
    assert sorted(os.listdir(target.parent)) == ["dit.inputs.npz", "dit.onnx"]
    assert stat.S_IMODE(target.parent.stat().st_mode) == 0o750 and stat.S_IMODE(target.stat().st_mode) == 0o640
    onnx.checker.check_model(str(target))
    before = snapshot(target.parent)

    rc, _, err = cli(capsys, "example", "dit", "-o", target)
    assert rc == 2
    assert_one_line(err, "already exists", "--force")
    rc, _, err = cli(capsys, "example", "dit", "-o", target.parent)
    assert rc == 2
    assert_one_line(err, "is a directory")

    monkeypatch.setattr(onnx, "save", _disk_full_after(1000))  # the model half-written, then the disk is full
    rc, _, err = cli(capsys, "example", "dit", "-o", target, "--force")
    assert rc == 2
    assert_one_line(err, "no space left", "nothing was kept")
    rc, _, err = cli(capsys, "example", "dit", "-o", tmp_path / "new" / "dit.onnx")
    assert rc == 2
    assert_one_line(err, "no space left")
    assert snapshot(target.parent) == before and not leftovers(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["models"]


def test_run_writes_atomically(exported, tmp_path, capsys, monkeypatch):
    inputs = tmp_path / "in.npz"
    np.savez(inputs, class_labels=np.array([1, 2], np.int64))
    result = tmp_path / "result"  # no .npz suffix: written as named
    with umask(0o027):
        assert cli(capsys, "run", exported, "--inputs", inputs, "-o", result)[0] == 0
    assert np.load(result)["latent"].shape == (2, 4, 8, 8) and stat.S_IMODE(result.stat().st_mode) == 0o640
    before = result.read_bytes()
    rc, _, err = cli(capsys, "run", exported, "--inputs", inputs, "-o", result)
    assert rc == 2
    assert_one_line(err, "already exists")
    monkeypatch.setattr(np, "savez", _disk_full_after(100))
    rc, _, err = cli(capsys, "run", exported, "--inputs", inputs, "--out", result, "--force")
    assert rc == 2
    assert_one_line(err, "no space left")
    assert result.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["in.npz", "result"]
    assert not leftovers(tmp_path)


def test_inspect_json_output(model, tmp_path, capsys):
    path = tmp_path / "a.json"
    assert cli(capsys, "inspect", model, "-o", path)[0] == 0
    first = path.read_text()
    rc, _, err = cli(capsys, "inspect", model, "--json", path)
    assert rc == 2
    assert_one_line(err, "already exists")
    assert cli(capsys, "inspect", model, "--json", path, "--force")[0] == 0
    assert path.read_text() == first
    rc, _, err = cli(capsys, "inspect", model, "-o", tmp_path)
    assert rc == 2
    assert_one_line(err, "is a directory")
    assert not leftovers(tmp_path)
