"""`omnicache-export serve OUT [--http-port P --grpc-port Q --max-batch N]`: serve an export as the
Triton model `omnicache` through PyTriton, requests stepped together (`serving.batcher`)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from omnicache_export.cli import args as common
from omnicache_export.errors import UserError

logger = logging.getLogger(__name__)

# PyTriton 0.7's instances other than the first fetch their config from the first one's handshake
# socket within 1 s of starting, and Triton starts them in parallel: on a loaded machine one can
# miss it and the model fails to load. A fresh start usually succeeds.
START_ATTEMPTS = 3


def register(verbs, parents: list[argparse.ArgumentParser]) -> None:
    p = verbs.add_parser("serve", parents=parents, help="serve an export through Triton (PyTriton)",
                         description="Serve an export as the Triton model 'omnicache': conditioning arrays of one "
                                     "row, optional uncond/<name>, seed int64 [1] in; latent out. Requests in flight "
                                     "share engine calls (step-level batching). SIGINT or SIGTERM stops it.")
    p.add_argument("folder", type=Path, help="an export's output folder")
    p.add_argument("--http-port", type=int, default=8000, metavar="P", help="HTTP port (default: 8000)")
    p.add_argument("--grpc-port", type=int, default=8001, metavar="Q", help="gRPC port (default: 8001)")
    p.add_argument("--metrics-port", type=int, default=8002, metavar="M", help="metrics port (default: 8002)")
    p.add_argument("--max-batch", type=int, default=16, metavar="N",
                   help="requests in flight at once, stepped together (default: 16)")
    p.add_argument("--instances", type=int, default=None, metavar="K",
                   help="Triton model instances, i.e. requests Triton hands over at once (default: the smaller of "
                        "--max-batch and 4: each is a stub process that must answer PyTriton's 1 s handshake at "
                        "start, which a loaded machine can miss when many start together)")
    p.add_argument("--device", default="cpu", help="the engines' device (default: cpu)")
    p.set_defaults(func=serve)


def _unload_models(triton) -> None:
    """Unload the model while the server still runs. PyTriton's `stop()` stops tritonserver first and
    unloads after, so the server waits its whole exit timeout (30 s) for a model whose stubs never
    finalize and then kills them; unloading first lets them finalize and the server exit at once."""
    try:
        triton._model_manager.clean()  # noqa: SLF001 - PyTriton 0.7 exposes no public unload
        triton._model_manager._models.clear()  # noqa: SLF001 - stop() would unload them again
    except Exception as exc:  # noqa: BLE001 - stop() below still ends the server
        logger.info("unloading the model before stopping the server failed: %s", exc)


def serve(a: argparse.Namespace) -> int:
    for flag, port in (("--http-port", a.http_port), ("--grpc-port", a.grpc_port), ("--metrics-port", a.metrics_port)):
        if not 1 <= port <= 65535:
            raise UserError(f"{flag} {port}: not a port (1 to 65535)")
    if len({a.http_port, a.grpc_port, a.metrics_port}) != 3:
        raise UserError("--http-port, --grpc-port and --metrics-port must differ")
    if a.max_batch < 1:
        raise UserError(f"--max-batch {a.max_batch}: must be at least 1")
    instances = min(a.max_batch, 4) if a.instances is None else a.instances
    if instances < 1:
        raise UserError(f"--instances {instances}: must be at least 1")
    common.input_folder(a.folder, "an export's output folder")
    from omnicache_export.serving.batcher import StepBatcher
    from omnicache_export.serving.pytriton_model import MODEL_NAME, bind, stub_library_path

    try:
        from pytriton.triton import Triton, TritonConfig
    except ImportError:
        raise UserError("serve needs PyTriton: pip install 'omnicache-export[serve]'") from None
    batcher = StepBatcher.load(a.folder, device=a.device, max_batch=a.max_batch)  # a bad OUT fails here, before Triton
    os.environ["LD_LIBRARY_PATH"] = stub_library_path()  # before Triton() starts tritonserver (it copies os.environ)
    triton = None
    try:
        batcher.start()
        config = TritonConfig(http_port=a.http_port, grpc_port=a.grpc_port, metrics_port=a.metrics_port, log_verbose=0)
        for attempt in range(1, START_ATTEMPTS + 1):
            triton = Triton(config=config)
            bind(triton, batcher, instances=instances)
            try:
                triton.run()
                break
            except Exception as exc:  # noqa: BLE001 - PyTriton's load failures: its log above has the detail
                triton.stop()
                triton = None
                if attempt == START_ATTEMPTS:
                    raise UserError(f"the Triton server could not load the model after {attempt} attempts "
                                    f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no detail'}); "
                                    "try fewer --instances") from None
                logger.warning("the Triton server could not load the model (attempt %d of %d): starting it again",
                               attempt, START_ATTEMPTS)
        print(f"serving model {MODEL_NAME!r} from {a.folder}: "
              f"http localhost:{a.http_port}, grpc localhost:{a.grpc_port}",
              file=sys.stderr, flush=True)
        while triton.is_alive():
            time.sleep(0.5)
        raise UserError("the Triton server stopped on its own (see its log above)")
    except BaseException as exc:
        from omnicache_export.cli.failures import Interrupted

        if isinstance(exc, (Interrupted, KeyboardInterrupt)):
            name = exc.name if isinstance(exc, Interrupted) else "SIGINT"
            print(f"{name}: stopping the server", file=sys.stderr, flush=True)
            return 0
        raise
    finally:
        if triton is not None:
            _unload_models(triton)
            triton.stop()  # tritonserver and its stubs end with it
        batcher.close()
