"""Reference inputs and outputs of both exported graphs, saved at export in Polygraphy's JSON format.

On the target, `polygraphy run PLAN --model-type engine --trt --load-inputs reference/G.inputs.json
--load-outputs reference/G.outputs.json` runs a TensorRT plan on exactly what ONNX Runtime ran at
export and compares the results (`build_engines.sh` does it for both plans). The feeds are those of
a real generation through the runtime's own dispatch: the full graph's at step 0 and the cache
graph's at its first cached step that follows two full steps (so every cache input holds a real
value), one sample (the export's static batch where it fixed one).

`polygraphy` (pure Python) writes and reads the files: imported here only when they are written.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from omnicache_export.runtime.graph_io import GraphIO
from omnicache_export.runtime.manifest import GRAPHS
from omnicache_export.runtime.sampler import SamplingSpec

FOLDER = "reference"
RUNNER = "onnxruntime-at-export"  # the runner name the saved outputs carry


def paths(graph: str) -> tuple[str, str]:
    """(inputs, outputs) file of `graph`, relative to the export folder."""
    return f"{FOLDER}/{graph}.inputs.json", f"{FOLDER}/{graph}.outputs.json"


def files() -> list[str]:
    return [p for graph in GRAPHS for p in paths(graph)]


def reference_schedule(full_steps) -> np.ndarray:
    """The export's schedule, or, where it caches no step, one with step 2 cached (the cache graph
    runs at any step: its tables are defined for every step)."""
    full = np.array(full_steps, dtype=bool)
    if full.all() and len(full) > 1:
        full[min(2, len(full) - 1)] = False
    return full


def capture(full: Path, cache: Path, full_io: GraphIO, cache_io: GraphIO, spec: SamplingSpec, full_steps,
            cond: Mapping[str, np.ndarray], uncond: Mapping[str, np.ndarray], batched: set[str],
            seed: int) -> dict[str, tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
    """graph -> (feeds, outputs) of one step each, run by the runtime on ONNX Runtime (CPU)."""
    import torch

    from omnicache_export.runtime.generation import Generation
    from omnicache_export.runtime.omnicache import OmniCache
    from omnicache_export.runtime.sampler import Denoiser, to_torch

    schedule = reference_schedule(full_steps)
    n_full_before = np.cumsum(np.concatenate([[0], schedule[:-1]]))
    cached = [i for i in range(len(schedule)) if not schedule[i]]
    cache_step = next((i for i in cached if n_full_before[i] >= 2), cached[0])
    rt = OmniCache.from_files(full, cache, full_io, cache_io, spec, schedule)
    rows = list(range(spec.chunk or 1))

    def first_rows(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:  # a static batch repeats the last
        return {k: (np.asarray(v)[[min(r, len(v) - 1) for r in rows]] if k in batched else np.asarray(v))
                for k, v in arrays.items()}

    got: dict[str, tuple[dict, dict]] = {}

    def host(tensors: Mapping[str, torch.Tensor]) -> dict:
        # numpy has no bfloat16: those stay torch tensors (Polygraphy's JSON encodes both)
        return {k: (v.detach().cpu().clone() if v.dtype == torch.bfloat16 else v.detach().cpu().numpy().copy())
                for k, v in tensors.items()}

    def observe(record) -> None:
        if record.full and "full" not in got:
            got["full"] = (host(rt.dispatch.full_feeds(record.model_feeds)), host(record.outputs))
        elif not record.full and record.i == cache_step:
            got["cache"] = (host(record.feeds), host(record.outputs))

    x0 = Denoiser(spec).initial_latents(rows, seed)
    gen = Generation(rt.dispatch, spec, schedule, to_torch(first_rows(cond)), to_torch(first_rows(uncond)), x0,
                     observer=observe)
    try:
        while "cache" not in got:  # only as far as the step it needs
            gen.step()
    finally:
        gen.close()
        rt.close()
    return got


def save(folder: Path, captured: Mapping[str, tuple[dict, dict]]) -> list[str]:
    """Write each graph's feeds and outputs under `folder/reference/`; returns the files written."""
    from polygraphy.comparator import IterationResult, RunResults
    from polygraphy.json import save_json
    from polygraphy.logger import G_LOGGER

    (folder / FOLDER).mkdir(exist_ok=True)
    written = []
    with G_LOGGER.verbosity(G_LOGGER.ERROR):  # its "saving ..." notes are not the job's output
        for graph in GRAPHS:
            feeds, outputs = captured[graph]
            inputs_file, outputs_file = paths(graph)
            save_json([dict(feeds)], str(folder / inputs_file))  # one iteration: Polygraphy's data-loader format
            results = RunResults()
            results.append((RUNNER, [IterationResult(dict(outputs), runner_name=RUNNER)]))
            results.save(str(folder / outputs_file))
            written += [inputs_file, outputs_file]
    return written


def load_inputs(folder: Path, graph: str) -> dict[str, np.ndarray]:
    """The saved feeds of `graph` (the first iteration)."""
    from polygraphy.json import load_json
    from polygraphy.logger import G_LOGGER

    with G_LOGGER.verbosity(G_LOGGER.ERROR):
        return dict(load_json(str(folder / paths(graph)[0]))[0])


def load_outputs(folder: Path, graph: str) -> dict[str, np.ndarray]:
    from polygraphy.comparator import RunResults
    from polygraphy.logger import G_LOGGER

    with G_LOGGER.verbosity(G_LOGGER.ERROR):
        results = RunResults.load(str(folder / paths(graph)[1]))
    return dict(results[RUNNER][0])
