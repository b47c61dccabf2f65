"""Input roles of an exported DiT: which input is the latent, which the timestep, which conditioning.

Guessed from names (diffusers' argument names and common variants) and shapes (the latent has the
output's shape, up to a doubled channel axis for learned-sigma models; the timestep is a scalar or a
vector over the batch), overridable by name.
"""

from __future__ import annotations

import onnx_ir as ir

from omnicache_export.errors import UserError
from omnicache_export.io_spec import IOSpec

LATENT_NAMES = ("hidden_states", "sample", "latent", "latents", "x", "img", "noisy_latents", "z", "x_t")
TIMESTEP_NAMES = ("timestep", "timesteps", "t", "sigma", "sigmas", "time", "ts")


def _dims(value: ir.Value) -> list[int | str | None]:
    if value.shape is None:
        return []
    return [d if isinstance(d, int) else (str(d) if d.value is not None else None) for d in value.shape.dims]


def _dtype(value: ir.Value) -> str:
    return value.dtype.name if value.dtype is not None else "UNDEFINED"


def _shape_matches_output(inp: list, out: list) -> bool:
    if len(inp) != len(out) or len(inp) < 3:
        return False
    diffs = [(a, b) for a, b in zip(inp[1:], out[1:]) if a != b]
    # learned sigma doubles one (channel) axis; symbolic dims compare as unknown
    return all(
        not (isinstance(a, int) and isinstance(b, int)) or b == 2 * a for a, b in diffs
    ) and sum(isinstance(a, int) and isinstance(b, int) and b == 2 * a for a, b in diffs) <= 1


def guess_roles(model: ir.Model, latent: str | None = None, timestep: str | None = None) -> list[IOSpec]:
    """Input specs with roles, then the output spec(s)."""
    inputs = [v for v in model.graph.inputs if not v.is_initializer()]
    names = [v.name for v in inputs]
    for flag, name in (("--latent", latent), ("--timestep", timestep)):
        if name is not None and name not in names:
            raise UserError(f"{flag} {name!r}: the model has no such input (inputs: {', '.join(names)})")
    out_dims = _dims(model.graph.outputs[0])
    floats = [v for v in inputs if v.dtype is not None and v.dtype.is_floating_point()]
    if latent is None:
        by_shape = [v for v in floats if _shape_matches_output(_dims(v), out_dims)]
        by_name = [v for v in by_shape or floats if v.name.lower() in LATENT_NAMES]
        pick = by_name or by_shape
        latent = pick[0].name if pick else None
    if timestep is None:
        small = [v for v in inputs if v.name != latent and len(_dims(v)) <= 1]
        by_name = [v for v in small if v.name.lower() in TIMESTEP_NAMES or "timestep" in v.name.lower()]
        by_name = by_name or [v for v in small if "time" in v.name.lower() or "sigma" in v.name.lower()]
        timestep = by_name[0].name if by_name else None
    specs = []
    for v in inputs:
        role = "latent" if v.name == latent else "timestep" if v.name == timestep else "conditioning"
        specs.append(IOSpec(v.name, _dtype(v), _dims(v), role))
    specs += [IOSpec(v.name, _dtype(v), _dims(v), "output") for v in model.graph.outputs]
    return specs
