"""`omnicache-export`: one verb per job (Polygraphy style).

  omnicache-export MODEL.onnx -o OUT                     the main job (same as `export`)
  omnicache-export run OUT [--inputs FILE.npz] -o RESULT.npz
  omnicache-export inspect MODEL.onnx [-o FILE.json]     input roles and the located block stack
  omnicache-export split MODEL.onnx -o OUT               full.onnx + cache.onnx
  omnicache-export example NAME -o MODEL.onnx            a DiT export to try it on
  omnicache-export check MODEL.onnx|OUT                  TensorRT readiness (10.3, 10.16, 11.x)
  omnicache-export build OUT [--batch MIN,OPT,MAX]       both TensorRT engines (TensorRT + GPU)
  omnicache-export export-model FOLDER -o MODEL.onnx     a diffusers transformer (save_pretrained) to ONNX
  omnicache-export serve OUT [--http-port P]             serve it as the Triton model `omnicache` (PyTriton)
  omnicache-export triton-repo OUT -o REPO               a model repository for a stock Triton server

Every verb takes -o/--output, --force, -v and -q. Bad input, a signal, a full disk: one line on
stderr, exit status 2 (130 for SIGINT, 143 for SIGTERM), and nothing half-written left behind;
-v shows the traceback. A bug shows its traceback and exits with status 1.
"""

from __future__ import annotations

import argparse
import sys

from omnicache_export.cli import args as common
from omnicache_export.cli import (build, check, example, export, export_model, failures, inspect, run, serve,
                                  split, triton_repo)

VERBS = ("export", "run", "inspect", "split", "example", "check", "build", "export-model", "serve", "triton-repo")
_TOP_FLAGS = {"-v", "--verbose", "-q", "--quiet"}


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("omnicache-export")
    except Exception:  # noqa: BLE001 - not installed: the source tree's own
        from omnicache_export import __version__

        return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=failures.PROG, description=__doc__.split("\n\n")[0],
                                     epilog="Run `omnicache-export VERB --help` for a verb's options.")
    parser.add_argument("--version", action="version", version=f"{failures.PROG} {_version()}")
    common.add_logging_options(parser, top=True)
    shared = argparse.ArgumentParser(add_help=False)
    common.add_logging_options(shared)
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for module in (export, run, inspect, split, example, check, build, export_model, serve, triton_repo):
        module.register(verbs, [shared])
    return parser


def _with_default_verb(argv: list[str]) -> list[str]:
    """`omnicache-export [-v] MODEL.onnx ...` is `omnicache-export [-v] export MODEL.onnx ...`."""
    i = 0
    while i < len(argv) and argv[i] in _TOP_FLAGS:
        i += 1
    if i < len(argv) and argv[i] not in VERBS and argv[i] not in ("-h", "--help", "--version"):
        return [*argv[:i], "export", *argv[i:]]
    return argv


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if all(a in _TOP_FLAGS for a in argv):  # a bare command: the help, as Polygraphy prints it
        parser.print_help()
        return 0
    args = parser.parse_args(_with_default_verb(argv))
    with failures.logging_to_stderr(args.verbose, args.quiet):
        try:
            with failures.signals_raise():
                return args.func(args)
        except (Exception, failures.Interrupted, KeyboardInterrupt) as exc:
            return failures.report(exc, args)


if __name__ == "__main__":
    sys.exit(main())
