"""The engine interface: a compiled graph that maps named numpy inputs to named numpy outputs.

Backends (ONNX Runtime, TensorRT) implement it the way Polygraphy's runners do: build or load once,
describe the IO, run many times. The runtime only ever talks to this interface.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...]  # str/None: dynamic


class Engine(abc.ABC):
    """One inference graph, ready to run."""

    backend: str = "abstract"

    @property
    @abc.abstractmethod
    def inputs(self) -> list[TensorSpec]: ...

    @property
    @abc.abstractmethod
    def outputs(self) -> list[TensorSpec]: ...

    @abc.abstractmethod
    def run(self, feeds: Mapping[str, np.ndarray], output_names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Run once; `feeds` must hold every input; returns the requested outputs (all by default)."""

    def close(self) -> None:
        """Release the backend's resources (sessions, device memory)."""

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def check_feeds(self, feeds: Mapping[str, np.ndarray]) -> None:
        """One clear error for a missing input, a wrong rank, dtype or fixed dimension."""
        for spec in self.inputs:
            if spec.name not in feeds:
                raise ValueError(f"missing input {spec.name!r}")
            arr = feeds[spec.name]
            if arr.dtype != spec.dtype:
                raise ValueError(f"input {spec.name!r}: dtype {arr.dtype}, expected {spec.dtype}")
            if len(arr.shape) != len(spec.shape) or any(
                isinstance(d, int) and d != a for d, a in zip(spec.shape, arr.shape)
            ):
                raise ValueError(f"input {spec.name!r}: shape {list(arr.shape)}, expected {list(spec.shape)}")
