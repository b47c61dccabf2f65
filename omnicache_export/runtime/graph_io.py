"""What feeds each input of the two graphs and what each output is: the part of the manifest the
step dispatch runs on. Written by the graph side from the graphs it emitted, never guessed from
names by the runtime."""

from __future__ import annotations

import dataclasses
import enum


class Feed(str, enum.Enum):
    """Where the dispatch takes an input's value from (or what an output is)."""

    MODEL = "model"  # one of the model's own inputs (latent, timestep, conditioning); `source` names it
    STEP = "step"  # int64 [batch]: each row's step index, which the cache graph's tables are gathered by
    FULL_PREV = "full_prev"  # the model output of the last full step
    FULL_PREV2 = "full_prev2"  # ... of the full step before it
    CACHE = "cache"  # a cache tensor of the last full step; `source` names the full graph's output
    CACHE_PREV = "cache_prev"  # that cache tensor one full step earlier (the cache trend)
    CACHE_PREV2 = "cache_prev2"  # ... two full steps earlier (the second-order cache trend)
    TABLE = "table"  # a per-step correction table, [N, ...]: an input only in calibration's graphs
    OUTPUT = "output"  # an output: the model's output
    UNCORRECTED = "uncorrected"  # an output of calibration's cache graph: õ before the correction


@dataclasses.dataclass(frozen=True)
class TensorIO:
    name: str
    dtype: str  # ONNX element type name (FLOAT, FLOAT16, INT64 ...)
    shape: tuple[int | str, ...]  # str: a symbolic dim, named the same in both graphs ("batch" …)
    feed: Feed
    source: str | None = None  # MODEL: the model input; CACHE/CACHE_PREV(2)/TABLE: the cache or table name

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape), "feed": self.feed.value,
                "source": self.source}

    @classmethod
    def from_json(cls, data: dict) -> TensorIO:
        return cls(data["name"], data["dtype"], tuple(data["shape"]), Feed(data["feed"]), data.get("source"))


@dataclasses.dataclass(frozen=True)
class GraphIO:
    """One graph's inputs and outputs, in the graph's order."""

    inputs: tuple[TensorIO, ...]
    outputs: tuple[TensorIO, ...]

    def inputs_fed_by(self, *feeds: Feed) -> list[TensorIO]:
        return [t for t in self.inputs if t.feed in feeds]

    def outputs_of(self, *feeds: Feed) -> list[TensorIO]:
        return [t for t in self.outputs if t.feed in feeds]

    def to_json(self) -> dict:
        return {"inputs": [t.to_json() for t in self.inputs], "outputs": [t.to_json() for t in self.outputs]}

    @classmethod
    def from_json(cls, data: dict) -> GraphIO:
        return cls(tuple(TensorIO.from_json(t) for t in data["inputs"]),
                   tuple(TensorIO.from_json(t) for t in data["outputs"]))
