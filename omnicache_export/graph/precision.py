"""The main job's precision step: the user's model converted once, as loaded, before analysis and the
split, so both graphs, calibration and the runtime see the precision that is deployed
(`passes.convert_precision`); and the precision a graph holds, for the manifest's engine entry."""

from __future__ import annotations

import logging
from collections import Counter

import onnx_ir as ir

from omnicache_export.errors import UserError
from omnicache_export.graph.repair import describe_refusal, ort_load_error
from omnicache_export.graph.roles import guess_roles
from omnicache_export.passes.convert_precision import ConvertPrecisionPass, IOPrecision, Precision

logger = logging.getLogger(__name__)
_NAMES = {ir.DataType.FLOAT16: "fp16", ir.DataType.BFLOAT16: "bf16"}


def graph_precision(model: ir.Model) -> str:
    """fp16 / bf16 where most float weight bytes are of that type, else fp32."""
    weights: Counter[ir.DataType] = Counter()
    for value in model.graph.initializers.values():
        if value.const_value is not None and value.dtype is not None and value.dtype.is_floating_point():
            weights[value.dtype] += value.const_value.nbytes
    if not weights:
        return "fp32"
    return _NAMES.get(weights.most_common(1)[0][0], "fp32")


def convert_model(model: ir.Model, precision: str, io: str = "model", latent: str | None = None,
                  timestep: str | None = None) -> ir.Model:
    """`model` converted in place to `precision` (fp32: left as it is, whatever it holds); the
    timestep input found as the analysis finds it. A bf16 graph ONNX Runtime cannot run here is a
    UserError naming the op (its CPU provider has few bfloat16 kernels)."""
    precision, io = Precision(precision), IOPrecision(io)
    if precision == Precision.FP32:
        if io != IOPrecision.MODEL:
            raise UserError(f"--io-precision {io.value}: needs --precision fp16 or bf16")
        return model
    roles = guess_roles(model, latent, timestep)
    step = next((s.name for s in roles if s.role == "timestep"), None)
    try:
        conversion = ConvertPrecisionPass(precision, io, timestep=step)
        conversion(model)
    except (ir.passes.PreconditionError, ir.passes.PostconditionError) as exc:
        raise UserError(f"--precision {precision.value}: {exc}") from None
    logger.info("converted to %s: %d nodes kept in float32 (%s)", precision.value, len(conversion.kept),
                ", ".join(f"{r.value} {n}" for r, n in Counter(conversion.kept.values()).items()))
    if precision == Precision.BF16:
        reason = ort_load_error(ir.serde.serialize_model(model))
        if reason is not None:
            raise UserError(f"--precision bf16: ONNX Runtime cannot run the bf16 graph on this machine, so it "
                            f"cannot calibrate it ({describe_refusal(reason)}); use --precision fp16, or run on a provider with "
                            "bfloat16 kernels")
    return model
