"""cache-dit's DBCache (Fn=1 front block always computed, Bn=0, residual-difference threshold tuned
to the target full-step count), with and without its TaylorSeer calibrator (order 1).

cache-dit pins its own dependency set, so it runs in a separate virtual environment
(`CACHEDIT_PYTHON`, default /tmp/cachedit-venv/bin/python; made with
`python3 -m venv /tmp/cachedit-venv && pip install torch==2.13.0 && pip install cache-dit diffusers==0.42.*`).
The model travels as its diffusers base class, config and state dict; the worker
(`_cachedit_worker.py`) rebuilds the plain diffusers transformer, calls `cache_dit.enable_cache` on
it (cache-dit's own adapter for the class) and samples with this project's sampler, so noise,
scheduler and guidance are identical to every other run."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch

from ._torch import PeerRun, TorchCase

NAME = "cache-dit DBCache"
PYTHON = os.environ.get("CACHEDIT_PYTHON", "/tmp/cachedit-venv/bin/python")
WORKER = Path(__file__).with_name("_cachedit_worker.py")
REPO = Path(__file__).resolve().parents[2]


class Unavailable(Exception):
    pass


def diffusers_base(model: torch.nn.Module) -> type:
    import diffusers

    for cls in type(model).__mro__:
        if cls.__module__.startswith("diffusers.") and hasattr(diffusers, cls.__name__):
            return cls
    raise Unavailable(f"{type(model).__name__} is not a diffusers transformer")


def available() -> str | None:
    """None when cache-dit imports in its environment, else why not."""
    if not Path(PYTHON).exists():
        return f"no cache-dit environment at {PYTHON}"
    r = subprocess.run([PYTHON, "-c", "import cache_dit, diffusers, torch; print(cache_dit.__version__ if hasattr(cache_dit, '__version__') else '?', diffusers.__version__, torch.__version__)"],
                       capture_output=True, text=True, timeout=300)
    if r.returncode:
        return "cache-dit does not import: " + (r.stderr.strip().splitlines() or ["?"])[-1]
    return None


def version() -> str:
    r = subprocess.run([PYTHON, "-c", "import importlib.metadata as m; print(m.version('cache-dit'))"], capture_output=True, text=True)
    return r.stdout.strip()


def run_many(case: TorchCase, runs: list[tuple[bool, int]], extra_kwargs: dict | None = None,
             workdir: Path | None = None) -> list[PeerRun]:
    """One worker process for several (taylorseer, target full steps) runs on the same case."""
    base = diffusers_base(case.model)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        tmp = Path(tmp)
        torch.save({"state_dict": case.model.state_dict()}, tmp / "weights.pt")
        np.savez(tmp / "inputs.npz", **{f"cond/{k}": v for k, v in case.cond.items()},
                 **{f"uncond/{k}": v for k, v in case.uncond.items()})
        job = {
            "class": base.__name__, "config": dict(case.model.config), "input_names": case.input_names,
            "extra_kwargs": extra_kwargs or {}, "spec": case.spec.to_json(), "n": case.n, "seed": case.seed,
            "runs": [{"taylorseer": ts, "target_full": t} for ts, t in runs], "repo": str(REPO),
            "package_dirs": package_dirs(),
        }
        (tmp / "job.json").write_text(json.dumps(job, default=_json_default))
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        r = subprocess.run([PYTHON, str(WORKER), str(tmp)], capture_output=True, text=True, env=env, timeout=3600)
        if r.returncode:
            if os.environ.get("BENCH_DEBUG"):
                print(r.stderr[-4000:])
            lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
            raise Unavailable("cache-dit failed: " + (lines[-1] if lines else f"exit {r.returncode}"))
        res = json.loads((tmp / "result.json").read_text())
        return [PeerRun(np.load(tmp / f"final{k}.npy"), x["n_full"], x["wall_s"], x["setting"], x.get("note", ""))
                for k, x in enumerate(res)]


def package_dirs() -> dict[str, list[str]]:
    """Where this interpreter finds omnicache_export and the subpackages the runtime imports. pyproject
    lays some out from other folders (package-dir: engines/ becomes omnicache_export.engines), which a
    plain path entry in the worker's environment would not resolve."""
    import importlib.util

    import omnicache_export

    out = {"omnicache_export": list(omnicache_export.__path__)}
    for sub in ("engines",):
        name = f"omnicache_export.{sub}"
        out[name] = list(importlib.util.find_spec(name).submodule_search_locations)
    return out


def run(case: TorchCase, taylorseer: bool, extra_kwargs: dict | None = None, workdir: Path | None = None) -> PeerRun:
    return run_many(case, [(taylorseer, case.target_full)], extra_kwargs, workdir)[0]


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, (tuple, set)):
        return list(o)
    return str(o)
