"""CLI conventions (Polygraphy-like) and one line for every expected failure: -v/-q and -o/--output on
every verb, --version, a bare command, every default in --help, the scheduler in use, `run` without
--inputs, "is a directory", ONNX Runtime, OSError and diffusers errors, bugs."""

from __future__ import annotations

import argparse
import errno
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from cli_helpers import assert_one_line, cli, dit_export, leftovers
from omnicache_export.cli import failures
from omnicache_export.cli.main import VERBS, _with_default_verb, build_parser, main
from omnicache_export.pipeline.job import ExportOptions, _default_cached

pytestmark = pytest.mark.filterwarnings("ignore")
POSITIONAL = {"export": ["m.onnx"], "run": ["folder"], "inspect": ["m.onnx"], "split": ["m.onnx"], "example": ["dit"],
              "export-model": ["folder"], "check": ["m.onnx"], "build": ["folder"], "serve": ["folder"],
              "triton-repo": ["folder"]}


@pytest.fixture
def exported(zoo_export, tmp_path_factory):
    return dit_export(zoo_export, tmp_path_factory)


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_bare_command_prints_the_help(capsys):
    rc, out, err = cli(capsys)
    assert rc == 0 and err == ""
    assert out.startswith("usage: omnicache-export") and all(verb in out for verb in VERBS)


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == "omnicache-export 0.1.0"


NO_OUTPUT = {"check", "build", "serve"}  # they print (check), update OUT in place (build) or serve: no -o


@pytest.mark.parametrize("verb", sorted(NO_OUTPUT))
def test_verbs_without_an_output_take_v_and_q_before_or_after_the_verb(verb):
    parser = build_parser()
    base = POSITIONAL[verb]
    for argv, verbose, quiet in ((["-v", verb, *base], True, False), ([verb, *base, "-v"], True, False),
                                 (["-q", verb, *base], False, True), ([verb, "-q", *base], False, True)):
        a = parser.parse_args(argv)
        assert (a.verbose, a.quiet) == (verbose, quiet), argv


@pytest.mark.parametrize("verb", [v for v in VERBS if v not in NO_OUTPUT])
def test_every_verb_takes_v_q_and_o_before_or_after_the_verb(verb):
    parser = build_parser()
    base = POSITIONAL[verb]
    a = parser.parse_args([verb, *base, "-o", "x"])
    assert (a.verbose, a.quiet, a.output) == (False, False, Path("x"))
    for argv, verbose, quiet in (
        (["-v", verb, *base, "-o", "x"], True, False),
        ([verb, *base, "-o", "x", "-v"], True, False),
        (["-q", verb, *base, "--output", "x"], False, True),
        ([verb, "-q", *base, "--output", "x"], False, True),
        (["-v", verb, *base, "-q", "-o", "x", "--force"], True, True),
    ):
        a = parser.parse_args(argv)
        assert (a.verbose, a.quiet, a.output) == (verbose, quiet, Path("x")), argv


def test_output_aliases():
    parser = build_parser()
    assert parser.parse_args(["run", "f", "--out", "r.npz"]).output == Path("r.npz")
    assert parser.parse_args(["inspect", "m.onnx", "--json", "a.json"]).output == Path("a.json")
    for argv in (["m.onnx", "-o", "out"], ["-v", "m.onnx", "-o", "out"], ["-o", "out", "m.onnx"]):  # the default verb
        a = parser.parse_args(_with_default_verb(argv))
        assert (a.verb, a.model, a.output) == ("export", Path("m.onnx"), Path("out"))


def test_every_default_is_stated_in_help():
    for verb, sub in _subparsers(build_parser()).items():
        for action in sub._actions:
            if not action.option_strings or action.help == argparse.SUPPRESS or action.dest == "help":
                continue
            if action.required:
                continue
            assert "default" in (action.help or ""), (verb, action.option_strings)


def test_cache_ratio_default_text_is_what_the_code_does():
    help_ = next(a.help for a in _subparsers(build_parser())["export"]._actions if a.dest == "cache_ratio")
    assert "half the steps rounded down" in help_ and "--max-consecutive" in help_
    assert _default_cached(ExportOptions(steps=31)) == 15  # half, rounded down
    assert _default_cached(ExportOptions(steps=30, max_consecutive=1, allow_last_cached=False)) == 14  # fewer


def test_scheduler_in_use_is_printed_with_a_warning_when_not_given(zoo_export, tmp_path, capsys):
    rc, out, err = cli(capsys, zoo_export("dit", "torchscript"), "-o", tmp_path / "out", "--steps", "4",
                       "--num-calib", "1")
    assert rc == 0
    assert "sampling: DDIMScheduler (default, no --scheduler given), epsilon prediction, 4 steps, guidance scale 1" in out
    assert "omnicache-export: warning: no --scheduler given: sampling with DDIM" in err


@pytest.fixture(scope="module")
def unconditional(tmp_path_factory):
    """The tiny DiT with its class label fixed inside the graph: a model without conditioning inputs,
    through the main job with --scheduler flow-euler."""
    import torch

    from omnicache_export.zoo.families import FAMILIES
    from omnicache_export.zoo.patches import export_friendly_tensor_ops

    fam = FAMILIES["dit"]

    class Unconditional(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.dit = fam.build(0).eval()

        def forward(self, hidden_states, timestep):
            return self.dit(hidden_states, timestep, torch.zeros_like(timestep, dtype=torch.long))

    folder = tmp_path_factory.mktemp("unconditional")
    feeds = fam.example_inputs(2, 0)
    axes = {"hidden_states": {0: "batch"}, "timestep": {0: "batch"}, fam.output_name: {0: "batch"}}
    with torch.no_grad(), export_friendly_tensor_ops():
        torch.onnx.export(Unconditional(), (torch.from_numpy(feeds["hidden_states"]), torch.from_numpy(feeds["timestep"])),
                          str(folder / "model.onnx"), input_names=["hidden_states", "timestep"],
                          output_names=[fam.output_name], dynamic_axes=axes, opset_version=17, dynamo=False)
    import contextlib
    import io

    out = folder / "export"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(io.StringIO()):
        rc = main([str(folder / "model.onnx"), "-o", str(out), "--steps", "4", "--num-calib", "2", "-q",
                   "--scheduler", "flow-euler"])
    assert rc == 0
    return out, stdout.getvalue()


def test_scheduler_given_is_printed(unconditional):
    _, out = unconditional
    assert "sampling: FlowMatchEulerDiscreteScheduler (--scheduler flow-euler), flow matching, 4 steps" in out


def test_run_without_inputs_for_a_model_without_conditioning(unconditional, tmp_path, capsys):
    folder, _ = unconditional
    rc, out, err = cli(capsys, "run", folder, "-o", tmp_path / "r.npz", "--num-samples", "3", "--seed", "2")
    assert rc == 0 and err == ""
    latent = np.load(tmp_path / "r.npz")["latent"]
    assert latent.shape == (3, 4, 8, 8) and np.isfinite(latent).all()
    rc, _, _ = cli(capsys, "run", folder, "-o", tmp_path / "one.npz", "--seed", "2")
    assert rc == 0 and np.array_equal(np.load(tmp_path / "one.npz")["latent"], latent[:1])  # row 0 is row 0


def test_run_without_inputs_names_the_missing_inputs(exported, tmp_path, capsys):
    rc, _, err = cli(capsys, "run", exported, "-o", tmp_path / "r.npz")
    assert rc == 2
    assert_one_line(err, "the model takes conditioning (class_labels): give --inputs FILE.npz")
    inputs = tmp_path / "in.npz"
    np.savez(inputs, class_labels=np.array([1], np.int64))
    rc, _, err = cli(capsys, "run", exported, "--inputs", inputs, "--num-samples", "2", "-o", tmp_path / "r.npz")
    assert rc == 2
    assert_one_line(err, "--num-samples is for models without conditioning")
    assert sorted(os.listdir(tmp_path)) == ["in.npz"]


def test_a_directory_is_a_directory(zoo_export, exported, tmp_path, capsys):
    folder = tmp_path / "dir.onnx"
    folder.mkdir()
    model = zoo_export("dit", "torchscript")
    cases = [
        ((folder, "-o", tmp_path / "out"), "is a directory, not an ONNX file"),
        (("inspect", folder), "is a directory, not an ONNX file"),
        (("split", folder, "-o", tmp_path / "out"), "is a directory, not an ONNX file"),
        ((model, "-o", tmp_path / "out", "--calib", folder), "is a directory, not an .npz file"),
        ((model, "-o", tmp_path / "out", "--scheduler", folder), "is a directory, not a scheduler_config.json"),
        (("run", exported, "--inputs", folder, "-o", tmp_path / "r.npz"), "is a directory, not an .npz file"),
        (("run", model, "-o", tmp_path / "r.npz"), "is a file, not an export's output folder"),
    ]
    for argv, message in cases:
        rc, _, err = cli(capsys, *argv)
        assert rc == 2, argv
        assert_one_line(err, message)
    assert sorted(os.listdir(tmp_path)) == ["dir.onnx"]


def _unloadable(src: Path, path: Path) -> None:
    """The model with an operator ONNX Runtime does not know before its output."""
    proto = onnx.load(src)
    name = proto.graph.output[0].name
    for node in proto.graph.node:
        node.output[:] = [name + "_pre" if o == name else o for o in node.output]
    proto.graph.node.append(onnx.helper.make_node("Mystery", [name + "_pre"], [name], domain="com.example"))
    proto.opset_import.append(onnx.helper.make_opsetid("com.example", 1))
    onnx.save(proto, path)


def test_onnx_runtime_errors_name_the_input_model(zoo_export, tmp_path, capsys, monkeypatch):
    model = tmp_path / "mine.onnx"
    _unloadable(zoo_export("dit", "torchscript"), model)
    monkeypatch.chdir(tmp_path)
    for verb in ("export", "split"):
        rc, _, err = cli(capsys, verb, model, "-o", tmp_path / "out", "-q")
        assert rc == 2
        assert_one_line(err, "mine.onnx", "ONNX Runtime")
        assert "full.onnx" not in err
    assert sorted(os.listdir(tmp_path)) == ["mine.onnx"] and not leftovers(tmp_path)


def test_onnx_runtime_failures_while_running_are_one_line(exported, tmp_path, capsys, monkeypatch):
    """An ONNX Runtime error while sampling (whatever the runtime's own checks let through)."""
    from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

    from omnicache_export.runtime.omnicache import OmniCache

    def fails(self, *args, **kwargs):
        raise InvalidArgument("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : indices element out of data bounds,\n"
                              "idx=99 must be within the inclusive range [-11,10]")

    monkeypatch.setattr(OmniCache, "run", fails)
    inputs = tmp_path / "in.npz"
    np.savez(inputs, class_labels=np.array([1], np.int64))
    rc, _, err = cli(capsys, "run", exported, "--inputs", inputs, "-o", tmp_path / "r.npz")
    assert rc == 2
    assert_one_line(err, f"{exported}: ONNX Runtime failed: [ONNXRuntimeError] : 2 : INVALID_ARGUMENT", "idx=99")
    assert sorted(os.listdir(tmp_path)) == ["in.npz"]


def test_verbose_shows_the_traceback_of_an_expected_failure(tmp_path, capsys):
    for argv in (["-v", "inspect", tmp_path / "missing.onnx"], ["inspect", tmp_path / "missing.onnx", "-v"]):
        rc, _, err = cli(capsys, *argv)
        assert rc == 2
        assert "Traceback" in err and err.splitlines()[-1] == f"omnicache-export: error: {tmp_path / 'missing.onnx'}: no such file"


def test_a_bug_shows_its_traceback_and_asks_for_a_report(zoo_export, capsys, monkeypatch):
    import omnicache_export.graph.analysis as analysis

    def broken(*args, **kwargs):
        return 1 / 0

    monkeypatch.setattr(analysis, "analyze", broken)
    rc, _, err = cli(capsys, "inspect", zoo_export("dit", "torchscript"))
    assert rc == 1
    assert "Traceback" in err and "ZeroDivisionError" in err
    assert err.splitlines()[-1] == ("omnicache-export: error: this is a bug in omnicache-export; please report it "
                                    "with the command and the traceback")


def test_diffusers_scheduler_errors_are_one_line(zoo_export, tmp_path, capsys):
    config = tmp_path / "scheduler.json"
    config.write_text('{"_class_name": "DDIMScheduler", "beta_schedule": "nope"}\n')
    rc, _, err = cli(capsys, zoo_export("dit", "torchscript"), "-o", tmp_path / "out", "--steps", "4", "-q",
                     "--scheduler", config)
    assert rc == 2
    assert_one_line(err, "the diffusers scheduler DDIMScheduler refused the settings", "nope")
    assert sorted(os.listdir(tmp_path)) == ["scheduler.json"]


@pytest.mark.parametrize("code,message", [
    (errno.ENOSPC, "writing OUT: no space left on the device"),
    (errno.EFBIG, "writing OUT: file too large"),
    (errno.EACCES, "/x/y: Permission denied"),
])
def test_os_errors_are_one_line(code, message):
    exc = OSError(code, os.strerror(code), *(["/x/y"] if code == errno.EACCES else []))
    line = failures.describe(exc, argparse.Namespace(output=Path("OUT")))
    assert line.startswith(message) and "\n" not in line


def test_a_readable_model_folder_is_left_as_it_was(zoo_export, tmp_path, capsys):
    """`-o` onto the model's own folder, without --force: refused, the folder as it was."""
    folder = tmp_path / "m"
    folder.mkdir()
    shutil.copy(zoo_export("dit", "torchscript"), folder / "model.onnx")
    mode = folder.stat().st_mode
    rc, _, err = cli(capsys, folder / "model.onnx", "-o", folder)
    assert rc == 2
    assert_one_line(err, "holds the input")
    assert folder.stat().st_mode == mode and os.listdir(folder) == ["model.onnx"]
