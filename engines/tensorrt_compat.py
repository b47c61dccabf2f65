"""What the TensorRT backend needs to know about the TensorRT at hand: whether it imports, its
version, the GPU, the plan records (`PlanInfo`) and the API names that differ across versions.

Supported: TensorRT 10.3 (JetPack 6) to 11.4. Every name that is not in all of them is used
inside an `if hasattr(obj, "name"):` branch, commented with the versions that have it;
tests/test_tensorrt_static.py checks each name against the compiled bindings of 10.3, 10.16 and
11.4 and knows a name in such a branch is needed only where the guard holds.

Convention the static check relies on: `tensorrt` is imported as `trt`, inside the functions that
use it (this module imports without TensorRT), and every TensorRT object is held in a variable or
attribute annotated with its `trt.` type, so the check knows what each attribute is looked up on.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from omnicache_export.errors import UserError

if TYPE_CHECKING:
    import tensorrt as trt

Shape = tuple[int, ...]
# input name -> (min, opt, max) shapes of one optimization profile
Profile = Mapping[str, tuple[Sequence[int], Sequence[int], Sequence[int]]]

_INSTALL_HINT = "it is needed on the target only: pip install tensorrt (NVIDIA's index), with a CUDA GPU"


def require_tensorrt() -> None:
    """UserError in one line where `import tensorrt` fails (absent, or its libraries missing)."""
    try:
        import tensorrt  # noqa: F401
    except (ImportError, OSError) as exc:
        raise UserError(f"TensorRT is not installed: {_first_line(exc)}; {_INSTALL_HINT}") from None


def require_cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        raise UserError("TensorRT needs a CUDA GPU, and torch sees none (torch.cuda.is_available() is False)")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def version_tuple(text: str) -> tuple[int, ...]:
    """(10, 16, 1, 11) from "10.16.1.11" (trailing tags such as ".post1" dropped)."""
    return tuple(int(part) for part in re.findall(r"\d+", text.split("+")[0])[:4])


@functools.lru_cache(maxsize=None)
def trt_logger() -> trt.ILogger:
    """One logger for every builder and runtime (TensorRT warns when a second one is registered)."""
    require_tensorrt()
    import tensorrt as trt

    logger: trt.ILogger = trt.Logger(trt.Logger.WARNING)
    return logger


def tensorrt_version() -> str:
    require_tensorrt()
    import tensorrt as trt

    return str(trt.__version__)


# ------------------------------------------------------------------ the plan record


@dataclasses.dataclass(frozen=True)
class PlanInfo:
    """What one plan was built with and for: a plan deserializes only in the TensorRT version
    that built it and runs only on the GPU kind it was built for."""

    tensorrt_version: str  # "10.16.1.11"
    gpu_name: str  # "NVIDIA H200", "Orin"
    compute_capability: str  # "8.7"
    # one dict per optimization profile: input -> [min, opt, max] shapes, every dynamic input
    profiles: list[dict[str, list[list[int]]]] = dataclasses.field(default_factory=list)
    plan_bytes: int = 0

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping) -> PlanInfo:
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})

    def mismatch(self, here: PlanInfo) -> str | None:
        """Why this plan cannot run with `here`'s TensorRT on `here`'s GPU (None: it can)."""
        built = f"TensorRT {self.tensorrt_version} for {self.gpu_name} (sm {self.compute_capability})"
        this = f"TensorRT {here.tensorrt_version}, {here.gpu_name} (sm {here.compute_capability})"
        if here.tensorrt_version != self.tensorrt_version:
            return f"built by {built}; this machine has {this}: a plan loads only in the TensorRT version that built it"
        if here.compute_capability != self.compute_capability or here.gpu_name != self.gpu_name:
            return f"built by {built}; this machine has {this}: a plan runs only on the GPU it was built for"
        return None


def compute_capability_text(cc: str | Sequence[int]) -> str:
    """"8.7" from "8.7", (8, 7) or [8, 7]."""
    if isinstance(cc, str):
        return cc
    major, minor = cc
    return f"{int(major)}.{int(minor)}"


def plan_info_of_this_machine(device: int | None = None) -> PlanInfo:
    """The TensorRT version and the GPU (torch's current CUDA device, or `device`) here, as a
    PlanInfo without profiles; UserError (one line) without TensorRT or a CUDA GPU."""
    import torch

    version = tensorrt_version()
    require_cuda()
    index = torch.cuda.current_device() if device is None else device
    major, minor = torch.cuda.get_device_capability(index)
    return PlanInfo(version, torch.cuda.get_device_name(index), f"{major}.{minor}")


def check_plan_compatible(info: Any, device: int | None = None) -> None:
    """UserError (one line) where the plan `info` describes (a PlanInfo, or any record with
    tensorrt_version, gpu_name and compute_capability, such as the manifest's) cannot run here.
    Call it before deserializing: a plan from another TensorRT version fails deep inside it."""
    built = PlanInfo(str(info.tensorrt_version), str(info.gpu_name), compute_capability_text(info.compute_capability))
    problem = built.mismatch(plan_info_of_this_machine(device))
    if problem:
        raise UserError(problem)


def dims_tuple(dims: trt.Dims) -> tuple[int, ...]:
    """A TensorRT Dims as ints (-1: dynamic)."""
    return tuple(int(dims[i]) for i in range(len(dims)))


def profiles_json(profiles: Sequence[Profile]) -> list[dict[str, list[list[int]]]]:
    return [{name: [[int(d) for d in s] for s in shapes] for name, shapes in p.items()} for p in profiles]


# ------------------------------------------------------------------ API names that differ across versions


def engine_device_memory_bytes(engine: trt.ICudaEngine) -> int:
    """Activation memory one context of `engine` needs (the largest over its profiles)."""
    if hasattr(engine, "device_memory_size_v2"):  # 10.1 and later (includes weight-streaming scratch)
        return int(engine.device_memory_size_v2)
    return int(engine.device_memory_size)  # 10.0 only here (deprecated in 10.1, removed in 11.0)


def set_context_memory(context: trt.IExecutionContext, address: int, size: int) -> None:
    """Give a USER_MANAGED context its activation memory."""
    if hasattr(context, "set_device_memory"):  # 10.1 and later: address and size
        context.set_device_memory(address, size)
    else:  # 10.0: the `device_memory` property (address only; not in the 10.13 stubs)
        context.device_memory = address  # type: ignore[attr-defined]


def parser_error_line(parser: trt.OnnxParser, path: object) -> str:
    """The ONNX parser's first error, one line: the node (index, name, operator) and the message."""
    count = int(parser.num_errors)
    if not count:
        return f"{path}: TensorRT's ONNX parser refused the model (no error recorded; see TensorRT's log above)"
    error: trt.ParserError = parser.get_error(0)
    where = f"node {int(error.node())} ({error.node_name() or '?'}, {error.node_operator() or '?'})"
    more = f" (+{count - 1} more)" if count > 1 else ""
    message = " ".join(str(error.desc()).split())
    return f"{path}: TensorRT's ONNX parser: {where}: {message}{more}"
