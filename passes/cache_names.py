"""Names of the tensors the split adds: the contract between the two graphs and the runtime."""

CACHE = "omnicache_cache"


def cache_name(index: int) -> str:
    """`omnicache_cache` for the main stream, `omnicache_cache_1`, ... for further ones (e.g. a text stream)."""
    return CACHE if index == 0 else f"{CACHE}_{index}"


def stream_type(stream) -> tuple:
    """(ir type, ir shape) of a cache tensor, from the stream's recorded dtype and shape."""
    import onnx_ir as ir

    dims = [d if isinstance(d, int) else (str(d) if d else None) for d in stream.shape]
    shape = ir.Shape(dims) if stream.shape else None
    return ir.TensorType(ir.DataType[stream.dtype]), shape
