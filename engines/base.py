"""The engine interface on device tensors (torch), split as Polygraphy splits it.

- A *loader* holds the settings (path, device, threads, spinning, providers …) and builds or loads
  the compiled graph once, lazily, on its first call: `engine = loader()`.
- An *engine* is the compiled graph, shared by every generation: its IO specs and `runner()`.
- A *runner* owns what one concurrent generation needs (execution context, stream, IO binding).
  `infer(feeds, outputs)` reads device tensors and writes the outputs into buffers the caller
  allocated once (`output_shapes` tells their shapes), so nothing crosses to the host.

The runtime, calibration and the benchmarks only ever talk to this interface.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Mapping, Sequence

import torch


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int | str | None, ...]  # str/None: dynamic


class Runner(abc.ABC):
    """One execution context of an engine; use one per concurrent generation."""

    def __init__(self, engine: Engine):
        self.engine = engine

    @abc.abstractmethod
    def output_shapes(self, input_shapes: Mapping[str, Sequence[int]]) -> dict[str, tuple[int, ...]]:
        """Every output's shape for these input shapes (to allocate the buffers once)."""

    @abc.abstractmethod
    def infer(
        self,
        feeds: Mapping[str, torch.Tensor],
        outputs: Mapping[str, torch.Tensor] | None = None,
        names: Sequence[str] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Run once. `feeds` holds every input: contiguous, on the engine's device, in its dtype.
        The outputs named in `names` (default: all) are written into the tensors of `outputs`
        where given (right shape, dtype and device) and allocated otherwise; returns them by name."""

    def close(self) -> None:
        """Release the context's resources (bindings, streams)."""

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Engine(abc.ABC):
    """One compiled inference graph, shared by its runners."""

    backend: str = "abstract"
    device: torch.device
    _inputs: list[TensorSpec]  # set by each backend when it loads the graph
    _outputs: list[TensorSpec]

    @property
    def inputs(self) -> list[TensorSpec]:
        return self._inputs

    @property
    def outputs(self) -> list[TensorSpec]:
        return self._outputs

    @abc.abstractmethod
    def runner(self) -> Runner:
        """A new execution context."""

    @classmethod
    def generation_runners(cls, engines: Sequence[Engine]) -> list[Runner]:
        """A runner of each of `engines` (all of this class) for one generation, whose engines run in
        turn, never at once: a backend overrides it to share per-generation resources among them
        (TensorRT: one activation buffer and stream)."""
        return [e.runner() for e in engines]

    def close(self) -> None:
        """Release the compiled graph."""

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class EngineLoader(abc.ABC):
    """Builds or loads an engine on its first call and returns the same one after."""

    def __init__(self) -> None:
        self._engine: Engine | None = None

    @abc.abstractmethod
    def load(self) -> Engine: ...

    def __call__(self) -> Engine:
        if self._engine is None:
            self._engine = self.load()
        return self._engine


def generation_runners(*engines: Engine) -> tuple[Runner, ...]:
    """A runner of each engine for one generation, in order: engines of one backend class get their
    runners from that class's `Engine.generation_runners`, so they can share what it shares."""
    by_class: dict[type, list[int]] = {}
    for i, e in enumerate(engines):
        by_class.setdefault(type(e), []).append(i)
    runners: list[Runner | None] = [None] * len(engines)
    for cls, idx in by_class.items():
        for i, r in zip(idx, cls.generation_runners([engines[i] for i in idx])):
            runners[i] = r
    return tuple(r for r in runners if r is not None)


def infer_numpy(engine: Engine, feeds: Mapping, names: Sequence[str] | None = None) -> dict:
    """One run on host numpy arrays, for the edges (split verification, tests, the benchmark's peer
    methods): copies in and out, so never inside the runtime's loop. Extra feeds are ignored."""
    import numpy as np

    wanted = {s.name for s in engine.inputs}
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)).to(engine.device) for k, v in feeds.items() if k in wanted}
    with engine.runner() as runner:
        out = runner.infer(tensors, names=names)
    return {k: v.cpu().numpy() for k, v in out.items()}
