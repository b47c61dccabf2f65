"""Names of the tensors the split and the correction add: the contract between the two graphs,
calibration and the runtime."""

CACHE = "omnicache_cache"
STEP = "omnicache_step"  # cache graph: int64 [batch], each row's step index its per-step tables are gathered by
FULL_PREV = "omnicache_full_prev"  # cache graph: the model outputs of the last two full steps
FULL_PREV2 = "omnicache_full_prev2"

# The per-step tables of the cache graph, [N, ...], gathered by STEP. Graph inputs of the parametric
# graph (calibration feeds each candidate's), initializers once FreezeTablesPass has run (the export).
TREND = "omnicache_cache_trend"  # [N] float32: ρ, the cache trend (ExtrapolateCachePass)
TREND2 = "omnicache_cache_trend2"  # [N] float32: σ, on the trend one full step earlier (second order)
COEFFICIENTS = "omnicache_coefficients"  # [N]: the correction's factor (EmbedCorrectionPass)
BLEND = "omnicache_blend"  # [N]: λ, how far the base moves to the last full output
MASKS = "omnicache_filter_masks"  # [N, h, w]: each step's frequency mask, scaled by 1 / (h w)
TABLES = (TREND, TREND2, COEFFICIENTS, BLEND, MASKS)


def cache_name(index: int) -> str:
    """`omnicache_cache` for the main stream, `omnicache_cache_1`, ... for further ones (e.g. a text stream)."""
    return CACHE if index == 0 else f"{CACHE}_{index}"


def stream_type(stream, exit_value) -> tuple:
    """(ir type, ir shape) of a cache tensor.

    The exporter's own annotation of h_L wins: concrete dims where the graph had symbolic ones can
    break type inference of dead If branches (TorchScript's `if x.ndim == 4: x = x.squeeze(1)`).
    Without one, the shape the analysis inferred, batch-dependent dims symbolic.
    """
    import onnx_ir as ir

    type_ = exit_value.type or ir.TensorType(ir.DataType[stream.dtype])
    if exit_value.shape is not None:
        return type_, exit_value.shape
    dims = [d if isinstance(d, int) else (str(d) if d else None) for d in stream.shape]
    return type_, ir.Shape(dims) if stream.shape else None


def uncorrected_name(output: str) -> str:
    """õ, the cache graph's output before the correction (an output of calibration's graph)."""
    return f"{output}_uncorrected"


def prev_cache_name(name: str) -> str:
    """The cache tensor of the full step before the last one (the cache trend's second point)."""
    return f"{name}_prev"


def prev2_cache_name(name: str) -> str:
    """The cache tensor two full steps before the last one (the second-order and fitted trends' third point)."""
    return f"{name}_prev2"


def widened(dtype):
    """The dtype corrections are computed in: float32 for 16-bit floats (sums over h·w entries
    lose too much in half precision), else the dtype itself."""
    import onnx_ir as ir

    return {ir.DataType.FLOAT16: ir.DataType.FLOAT, ir.DataType.BFLOAT16: ir.DataType.FLOAT}.get(dtype, dtype)


def add_table_input(graph, name: str, dims: list[int], dtype):
    """A per-step table as a new graph input (FreezeTablesPass later turns it into a constant)."""
    import onnx_ir as ir

    value = ir.Value(name=name, shape=ir.Shape(dims), type=ir.TensorType(dtype))
    graph.inputs.append(value)
    return value


def add_step_input(graph):
    """The per-row step index, int64 [batch], as a new graph input (its dim unnamed here: a [1] step
    still broadcasts; `graph.embed.build_cache_graph` names it after the output's batch)."""
    import onnx_ir as ir

    value = ir.Value(name=STEP, shape=ir.Shape([None]), type=ir.TensorType(ir.DataType.INT64))
    graph.inputs.append(value)
    return value
