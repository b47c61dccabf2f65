"""`omnicache-export run OUT [--inputs FILE.npz] -o RESULT.npz`: sample with an export."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from omnicache_export.cli import args as common
from omnicache_export.errors import UserError


def register(verbs, parents: list[argparse.ArgumentParser]) -> None:
    p = verbs.add_parser("run", parents=parents, help="sample with the exported graphs and the runtime",
                         description="Sample with an export's graphs; writes the final latents under 'latent' and "
                                     "prints {wall_s, full_steps, cached_steps}.")
    p.add_argument("folder", type=Path, help="an export's output folder")
    common.add_output_options(p, "where to write the final latents, an .npz under key 'latent' (written under a "
                              "temporary name, renamed at the end)", "RESULT.npz", aliases=("--out",))
    p.add_argument("--inputs", type=Path, metavar="FILE.npz",
                   help="conditioning, as for --calib (default: none, for a model without conditioning inputs)")
    p.add_argument("--num-samples", type=int, default=None, metavar="N",
                   help="rows to sample for a model without conditioning inputs (default: 1); with --inputs, "
                        "its rows")
    p.add_argument("--seed", type=int, default=0, metavar="S",
                   help="noise seed (>= 0): row r starts from the noise of (seed, r) (default: 0)")
    p.add_argument("--no-cache", action="store_true", help="full model at every step, the reference (default: off)")
    p.add_argument("--batch-size", type=int, default=None, metavar="B",
                   help="rows per generation; row r's noise comes from (seed, r) whatever the batching "
                        "(default: all rows; the export's static batch where it fixed one)")
    p.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    import numpy as np

    from omnicache_export import outputs
    from omnicache_export.runtime.conditioning import batched_inputs, load_conditioning
    from omnicache_export.runtime.omnicache import OmniCache
    from omnicache_export.runtime.sampler import Denoiser

    if a.seed < 0:
        raise UserError(f"--seed {a.seed}: must be >= 0")
    if a.batch_size is not None and a.batch_size < 1:
        raise UserError(f"--batch-size {a.batch_size}: must be at least 1")
    if a.num_samples is not None and a.num_samples < 1:
        raise UserError(f"--num-samples {a.num_samples}: must be at least 1")
    if a.num_samples is not None and a.inputs is not None:
        raise UserError("--num-samples is for models without conditioning: with --inputs, its rows are sampled")
    common.input_folder(a.folder, "an export's output folder")
    common.input_file(a.inputs, "an .npz file")
    protected = [a.folder, a.inputs]
    outputs.check_output_file(a.output, force=a.force, inputs=protected)  # before any work
    rt = OmniCache.load(a.folder)
    try:
        io = rt.manifest.model_io.inputs
        if a.inputs is None:
            needed = [s.name for s in io if s.role == "conditioning"]
            if needed:
                raise UserError(f"{a.folder}: the model takes conditioning ({', '.join(needed)}): give --inputs FILE.npz")
            cond, uncond, rows = {}, {}, list(range(a.num_samples or 1))
        else:
            loaded = load_conditioning(a.inputs, io, rt.spec.cfg)
            cond, uncond, rows = loaded.cond, loaded.uncond, None
        Denoiser(rt.spec)  # imports diffusers and builds the scheduler once: wall_s is the loop alone
        t0 = time.perf_counter()
        result = rt.run(cond, uncond, a.seed, batched=batched_inputs(io), batch_size=a.batch_size,
                        no_cache=a.no_cache, rows=rows)
        wall = time.perf_counter() - t0
    finally:
        rt.close()
    with outputs.atomic_output_files(a.output, force=a.force, inputs=protected) as tmp:
        with open(tmp / a.output.name, "wb") as f:  # a file object: numpy appends no .npz to the name
            np.savez(f, latent=result.final)
    print(json.dumps({"wall_s": round(wall, 4), "full_steps": result.full_steps, "cached_steps": result.cached_steps}))
    return 0
