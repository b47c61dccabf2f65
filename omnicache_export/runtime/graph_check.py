"""What the runtime acts on, cross-checked against the hashed graphs it runs.

`read_manifest` proves the graph files are the ones the export wrote; this module proves the
manifest's other fields describe those graphs. `check_graphs(manifest, full, cache)` (called by
`OmniCache.load` after `read_manifest`) refuses with one line naming the field and the step:

- IO: the inputs and outputs the manifest's `graphs` records name, in order with their element
  types, are the graphs' own.
- The embedded record: where the cache graph carries the schedule and the sampling record it was
  exported for (model metadata `omnicache.schedule`, "FFCFC…", and `omnicache.sampling`, the
  manifest's `sampling` as JSON; `embedded_metadata` builds them), the manifest's must equal
  them. This catches every flipped schedule entry, whatever the correction.
- The tables: `correction.coefficients`, `.blend`, `.cache_trend` and `.cache_trend2` equal the
  graph's frozen `omnicache_coefficients`, `omnicache_blend`, `omnicache_cache_trend` and
  `omnicache_cache_trend2` (an absent table, or an absent `cache_trend2`, is all zeros), and the
  filter masks are there exactly when the manifest's filter needs them.
- Schedule against tables: with a_i the time ratio of step i to its last two full steps (from the
  schedule and the timesteps the runtime's scheduler gives, which must be the manifest's), every
  table is 0 at full steps and where a_i = 0 (σ also before three full steps), the coefficient is
  gamma_i * a_i, and a trend or blend table in use is nonzero wherever it applies
  (docs/method.md, "Pass 2"). Where one flipped entry
  explains the disagreement, the line names that step. A graph whose tables are all zero (the
  "none" correction) says nothing about the schedule: only the embedded record checks it there.

The graphs are read with a small protobuf wire-format reader of our own (the runtime imports no
onnx): it seeks past nodes and weights, and reads only the few per-step tables, from the graph or
from its hashed external-data file, so a multi-GB graph costs a few reads.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from omnicache_export.errors import UserError
from omnicache_export.runtime.manifest import Manifest, resolve_inside, unsafe_path

COEFFICIENTS = "omnicache_coefficients"  # the names passes.cache_names gives the frozen tables
BLEND = "omnicache_blend"
TREND = "omnicache_cache_trend"
TREND2 = "omnicache_cache_trend2"
MASKS = "omnicache_filter_masks"
SCHEDULE_KEY = "omnicache.schedule"  # model metadata of cache.onnx: the schedule it was exported for
SAMPLING_KEY = "omnicache.sampling"  # ... and the sampling record, as JSON
RTOL, ATOL = 1e-5, 1e-7  # a float32 table against the same value recomputed in float64
_MAX_TABLE = 1 << 24  # values: a per-step table is [N] (N <= the scheduler's training steps)

# ONNX TensorProto.DataType codes and names; the float types a table may have, as numpy reads them
_DTYPES = {1: "FLOAT", 2: "UINT8", 3: "INT8", 4: "UINT16", 5: "INT16", 6: "INT32", 7: "INT64", 8: "STRING",
           9: "BOOL", 10: "FLOAT16", 11: "DOUBLE", 12: "UINT32", 13: "UINT64", 14: "COMPLEX64",
           15: "COMPLEX128", 16: "BFLOAT16", 17: "FLOAT8E4M3FN", 18: "FLOAT8E4M3FNUZ", 19: "FLOAT8E5M2",
           20: "FLOAT8E5M2FNUZ", 21: "UINT4", 22: "INT4", 23: "FLOAT4E2M1"}
_FLOAT_TABLES = {1: "<f4", 10: "<f2", 11: "<f8", 16: "bf16"}
_ROUNDING = {"FLOAT": np.float32, "FLOAT16": np.float16, "DOUBLE": np.float64}  # bfloat16: compared to 1 %


def embedded_metadata(schedule_full: Sequence[bool], sampling_json: Mapping) -> dict[str, str]:
    """The model metadata the exporter puts into cache.onnx so the runtime can check the manifest's
    schedule and sampling record against the hashed graph (`check_graphs`)."""
    return {SCHEDULE_KEY: _pattern(schedule_full),
            SAMPLING_KEY: json.dumps(dict(sampling_json), sort_keys=True, allow_nan=False)}


# ------------------------------------------------------------------ protobuf wire format


class _Malformed(ValueError):
    pass


class _Wire:
    """Fields of protobuf messages in a seekable binary file; length-delimited payloads are
    (offset, length) pairs, skipped unless read."""

    def __init__(self, f):
        self.f = f

    def varint(self) -> int:
        result = shift = 0
        while True:
            b = self.f.read(1)
            if not b:
                raise _Malformed("truncated")
            result |= (b[0] & 0x7F) << shift
            if b[0] < 0x80:
                return result
            shift += 7
            if shift > 63:
                raise _Malformed("varint too long")

    def fields(self, start: int, end: int) -> Iterator[tuple[int, int, object]]:
        self.f.seek(start)
        while self.f.tell() < end:
            key = self.varint()
            field, wire = key >> 3, key & 7
            if wire == 0:
                yield field, wire, self.varint()
            elif wire in (1, 5):
                raw = self.f.read(8 if wire == 1 else 4)
                if len(raw) != (8 if wire == 1 else 4):
                    raise _Malformed("truncated")
                yield field, wire, raw
            elif wire == 2:
                n = self.varint()
                at = self.f.tell()
                if at + n > end:
                    raise _Malformed("a field runs past its message")
                yield field, wire, (at, n)
                self.f.seek(at + n)
            else:
                raise _Malformed(f"wire type {wire}")
        if self.f.tell() != end:
            raise _Malformed("a field runs past its message")

    def read(self, span) -> bytes:
        at, n = span
        self.f.seek(at)
        data = self.f.read(n)
        if len(data) != n:
            raise _Malformed("truncated")
        return data

    def string(self, span) -> str:
        return self.read(span).decode("utf-8", errors="replace")

    def varints(self, span) -> list[int]:
        at, n = span
        self.f.seek(at)
        out = []
        while self.f.tell() < at + n:
            out.append(self.varint())
        return out


@dataclasses.dataclass
class _Tensor:
    name: str = ""
    dims: list = dataclasses.field(default_factory=list)
    dtype: int = 0
    payload: dict = dataclasses.field(default_factory=dict)  # field -> [(wire, value)]
    external: dict = dataclasses.field(default_factory=dict)
    location: int = 0  # 1: external data


@dataclasses.dataclass
class GraphFacts:
    """What `check_graphs` reads from one ONNX file."""

    inputs: list[tuple[str, str | None]]  # (name, element type name) of the graph inputs, initializers left out
    outputs: list[tuple[str, str | None]]
    metadata: dict[str, str]
    tables: dict[str, np.ndarray]  # the wanted float initializers, as float64
    shapes: dict[str, tuple[int, ...]]  # dims of every wanted initializer (tables and shape_only)
    dtypes: dict[str, str]  # their element type names


def _tensor(w: _Wire, span, keep) -> _Tensor:
    """A TensorProto's name, type, storage; its dims only where its name is in `keep` (the data is
    never read here)."""
    t, spans = _Tensor(), []
    for field, wire, v in w.fields(span[0], span[0] + span[1]):
        if field == 8 and wire == 2:
            t.name = w.string(v)
        elif field == 1:
            spans.append((wire, v))
        elif field == 2 and wire == 0:
            t.dtype = v
        elif field in (4, 5, 9, 10):
            t.payload.setdefault(field, []).append((wire, v))
        elif field == 13 and wire == 2:
            entry = {}
            for f2, w2, v2 in w.fields(v[0], v[0] + v[1]):
                if w2 == 2 and f2 in (1, 2):
                    entry[f2] = w.string(v2)
            t.external[entry.get(1, "")] = entry.get(2, "")
        elif field == 14 and wire == 0:
            t.location = v
    if t.name in keep:
        for wire, v in spans:
            t.dims += w.varints(v) if wire == 2 else [v]
    return t


def _value_info(w: _Wire, span) -> tuple[str, str | None]:
    name, elem = "", None
    for field, wire, v in w.fields(span[0], span[0] + span[1]):
        if field == 1 and wire == 2:
            name = w.string(v)
        elif field == 2 and wire == 2:  # TypeProto
            for f2, w2, v2 in w.fields(v[0], v[0] + v[1]):
                if f2 == 1 and w2 == 2:  # tensor_type
                    for f3, w3, v3 in w.fields(v2[0], v2[0] + v2[1]):
                        if f3 == 1 and w3 == 0:
                            elem = _DTYPES.get(v3, str(v3))
    return name, elem


def _values(w: _Wire, t: _Tensor, external_file) -> np.ndarray:
    """A float tensor's values as float64 (raw, typed or external data)."""
    if t.dtype not in _FLOAT_TABLES:
        raise _Malformed(f"{t.name!r} has element type {_DTYPES.get(t.dtype, t.dtype)}, not a float type")
    count = math.prod(t.dims)
    if count > _MAX_TABLE:
        raise _Malformed(f"{t.name!r} has dims {t.dims}: too large for a per-step table")
    code = _FLOAT_TABLES[t.dtype]
    itemsize = {"<f4": 4, "<f2": 2, "<f8": 8, "bf16": 2}[code]

    def decode(raw: bytes) -> np.ndarray:
        if len(raw) != count * itemsize:
            raise _Malformed(f"{t.name!r} holds {len(raw)} bytes for {count} values")
        if code == "bf16":
            return (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32).astype(np.float64)
        return np.frombuffer(raw, code).astype(np.float64)

    if t.location == 1:
        if external_file is None:
            raise _Malformed(f"{t.name!r} is in external data, and no external-data file is allowed")
        path = external_file(t.external.get("location", ""))
        try:
            offset = int(t.external.get("offset", "0") or 0)
            length = int(t.external.get("length", str(count * itemsize)) or 0)
        except ValueError:
            raise _Malformed(f"{t.name!r}: external data offset/length are not integers") from None
        with open(path, "rb") as f:
            f.seek(offset)
            return decode(f.read(length))
    if 9 in t.payload:
        return decode(b"".join(w.read(v) for _, v in t.payload[9]))
    if t.dtype in (1, 11) and (4 if t.dtype == 1 else 10) in t.payload:
        raw = b"".join(w.read(v) if wire == 2 else v for wire, v in t.payload[4 if t.dtype == 1 else 10])
        return decode(raw)
    if t.dtype in (10, 16) and 5 in t.payload:  # 16-bit floats as int32_data, one value each
        bits = [b for wire, v in t.payload[5] for b in (w.varints(v) if wire == 2 else [v])]
        return decode(np.array(bits, "<u4").astype("<u2").tobytes())
    if count == 0:
        return np.zeros(0)
    raise _Malformed(f"{t.name!r} holds no values")


def read_graph(path: Path, tables: set[str] = frozenset(), shape_only: set[str] = frozenset(),
               external_file=None) -> GraphFacts:
    """Inputs, outputs and model metadata of the ONNX file at `path`, the values of the float
    initializers named in `tables` and the dims of those in `shape_only` (top-level graph only).
    `external_file(location)` returns the path of an external-data file, or raises."""
    keep = set(tables) | set(shape_only)
    with open(path, "rb") as f:
        w = _Wire(f)
        size = f.seek(0, 2)
        metadata, inputs, outputs, found, initializers = {}, [], [], {}, set()
        for field, wire, v in w.fields(0, size):
            if field == 14 and wire == 2:  # metadata_props
                entry = {}
                for f2, w2, v2 in w.fields(v[0], v[0] + v[1]):
                    if w2 == 2 and f2 in (1, 2):
                        entry[f2] = w.string(v2)
                metadata[entry.get(1, "")] = entry.get(2, "")
            elif field == 7 and wire == 2:  # the graph
                for f2, w2, v2 in w.fields(v[0], v[0] + v[1]):
                    if w2 != 2:
                        continue
                    if f2 == 5:  # initializer: of the others only the name (old IRs list them as inputs)
                        t = _tensor(w, v2, keep)
                        initializers.add(t.name)
                        if t.name in keep:
                            found[t.name] = t
                    elif f2 == 11:
                        inputs.append(_value_info(w, v2))
                    elif f2 == 12:
                        outputs.append(_value_info(w, v2))
        values = {name: _values(w, t, external_file).reshape(t.dims) for name, t in found.items() if name in tables}
    return GraphFacts([i for i in inputs if i[0] not in initializers], outputs, metadata, values,
                      {name: tuple(t.dims) for name, t in found.items()},
                      {name: _DTYPES.get(t.dtype, str(t.dtype)) for name, t in found.items()})


# ------------------------------------------------------------------ the checks


def ratios(full: np.ndarray, timesteps: np.ndarray) -> np.ndarray:
    """a_i = (t_i − t_j)/(t_j − t_j') at a cached step i, j' < j its last two full steps; 0 at full
    steps and before two full steps (docs/method.md; calibration's `extrapolation_ratios`)."""
    full = np.asarray(full, bool)
    t = np.asarray(timesteps, np.float64)
    n = len(full)
    idx = np.arange(n)
    last = np.maximum.accumulate(np.where(full, idx, -1))  # the last full step <= i
    before = np.concatenate([[-1], last[:-1]])  # the last full step < i
    j = np.where(full, -1, last)
    j2 = np.where(full | (j <= 0), -1, before[np.maximum(j, 0)])
    ok = (j2 >= 0) & (t[np.maximum(j, 0)] != t[np.maximum(j2, 0)])
    a = np.zeros(n)
    a[ok] = (t[ok] - t[j[ok]]) / (t[j[ok]] - t[j2[ok]])
    return a


def _pattern(full) -> str:
    return "".join("F" if f else "C" for f in full)


def _kind(full: bool) -> str:
    return "full" if full else "cached"


def schedule_disagreement(full, timesteps, gammas, tables: Mapping[str, np.ndarray],
                          graph: str = "cache.onnx") -> tuple[int, str] | None:
    """The first step where the schedule `full` disagrees with the cache graph's `tables`
    (coefficients, blend, trends by name, all [N]; absent = zeros) and the manifest's gammas
    (None: no correction): (step, what disagrees), or None. `graph`: the cache graph's file name."""
    full = np.asarray(full, bool)
    a = ratios(full, timesteps)
    g = np.array([np.nan if x is None else x for x in gammas], np.float64)
    coef = tables[COEFFICIENTS]
    cached = ~full & (a != 0)
    bad: list[tuple[int, str]] = []

    def first(mask) -> int | None:
        hits = np.flatnonzero(mask)
        return int(hits[0]) if hits.size else None

    for name, table in tables.items():
        i = first((full | (a == 0)) & (table != 0))
        if i is not None:
            where = "a full step" if full[i] else "a cached step with no trend yet (fewer than two full steps before it)"
            bad.append((i, f"{graph}'s {name}[{i}] is {table[i]:.6g}, but the schedule makes step {i} {where}"))
    expected = (np.nan_to_num(g) * a).astype(np.float32).astype(np.float64)
    i = first(cached & ~np.isclose(coef, expected, rtol=RTOL, atol=ATOL))
    if i is not None:
        bad.append((i, f"{graph}'s {COEFFICIENTS}[{i}] is {coef[i]:.6g}, the schedule and timesteps give "
                       f"{expected[i]:.6g} (gamma {np.nan_to_num(g[i]):.6g} x a_{i} {a[i]:.6g})"))
    sigma = tables.get(TREND2)
    if sigma is not None:  # the older trend needs three full steps before the step
        i = first((np.cumsum(full) - full < 3) & (sigma != 0))
        if i is not None:
            bad.append((i, f"{graph}'s {TREND2}[{i}] is {sigma[i]:.6g}, but the schedule has fewer than three "
                           f"full steps before step {i}"))
    for name in (TREND, BLEND):
        table = tables.get(name)
        if table is not None and np.any(table):
            applies = cached & (a > 0) & ~np.isnan(g) if name == BLEND else cached
            i = first(applies & (table == 0))
            if i is not None:
                bad.append((i, f"{graph}'s {name}[{i}] is 0, but the schedule makes step {i} a cached step "
                               f"with a trend (a_{i} = {a[i]:.6g}), where the table applies"))
    return min(bad) if bad else None


def ratios_disagreement(full, timesteps, recorded) -> tuple[int, str] | None:
    """The first step where the manifest's `correction.ratios` do not follow from the schedule."""
    a, rec = ratios(full, timesteps), np.asarray(recorded, np.float64)
    hits = np.flatnonzero(~np.isclose(rec, a, rtol=1e-9, atol=1e-12))
    if not hits.size:
        return None
    i = int(hits[0])
    return i, f"correction.ratios[{i}] is {rec[i]:.6g}, the schedule and timesteps give {a[i]:.6g}"


def _explain(full, disagreement) -> int | None:
    """The one step whose flip makes `disagreement(schedule)` None (None: no single flip, or several)."""
    full = np.asarray(full, bool)
    fits = []
    for k in range(1, len(full)):
        flipped = full.copy()
        flipped[k] = not flipped[k]
        if disagreement(flipped) is None:
            fits.append(k)
            if len(fits) > 1:
                return None
    return fits[0] if fits else None


def _external_file(manifest: Manifest, graph: Path, label: str):
    """external_file for `read_graph`: only a file of the folder that the manifest hashes."""
    folder = Path(manifest.folder)
    root = folder.resolve()

    def find(location: str) -> Path:
        problem = unsafe_path(location)
        if not problem:
            target = (graph.parent / location).resolve()
            if root not in target.parents:
                problem = "it resolves outside the export folder"
            elif target.relative_to(root).as_posix() not in manifest.artifacts:
                problem = "it is not listed in artifacts (not hashed)"
            else:
                return resolve_inside(folder, target.relative_to(root).as_posix())
        raise UserError(f"{folder}: {label}: refusing the external data {location!r} of a correction table: {problem}")

    return find


def _read(manifest: Manifest, path: Path, label: str, **kwargs) -> GraphFacts:
    try:
        return read_graph(path, external_file=_external_file(manifest, Path(path).resolve(), label), **kwargs)
    except (_Malformed, OSError, ValueError) as exc:
        raise UserError(f"{manifest.folder}: {label}: not a readable ONNX graph ({exc})") from None


def _check_io(folder, label: str, file: str, graph_io, facts: GraphFacts) -> None:
    for side in ("inputs", "outputs"):
        recorded = [(t.name, t.dtype) for t in getattr(graph_io, side)]
        actual = getattr(facts, side)
        if [n for n, _ in recorded] != [n for n, _ in actual]:
            raise UserError(f"{folder}: graphs.{label}.{side} names {[n for n, _ in recorded]}, "
                            f"{file} has {[n for n, _ in actual]}")
        for i, ((name, dtype), (_, elem)) in enumerate(zip(recorded, actual)):
            if elem is not None and dtype != elem:
                raise UserError(f"{folder}: graphs.{label}.{side}[{i}] ({name!r}) is {dtype}, {file} has {elem}")


def _check_embedded(folder, m: Manifest, file: str, metadata: Mapping[str, str]) -> None:
    if SCHEDULE_KEY in metadata:
        built, told = metadata[SCHEDULE_KEY], m.schedule.pattern
        if built != told:
            if len(built) != len(told):
                raise UserError(f"{folder}: schedule has {len(told)} steps, {file} was exported for {len(built)} "
                                f"({built})")
            k = next(i for i, (b, t) in enumerate(zip(built, told)) if b != t)
            raise UserError(f"{folder}: schedule.full[{k}] is {_kind(told[k] == 'F')}, but {file} was exported "
                            f"with step {k} {_kind(built[k] == 'F')} (schedule {built}, the manifest says {told})")
    if SAMPLING_KEY in metadata:
        try:
            built = json.loads(metadata[SAMPLING_KEY])
        except json.JSONDecodeError:
            raise UserError(f"{folder}: {file}'s {SAMPLING_KEY} is not JSON") from None
        told = json.loads(json.dumps(m.sampling.to_json()))
        if built != told:
            keys = [*told, *(k for k in built if k not in told)]
            k = next(k for k in keys if k not in built or k not in told or built[k] != told[k])
            raise UserError(f"{folder}: sampling.{k} is {json.dumps(told.get(k))}, but {file} was exported for "
                            f"{json.dumps(built.get(k))}")


def _check_tables(folder, m: Manifest, file: str, facts: GraphFacts) -> dict[str, np.ndarray]:
    n = m.sampling.n_steps
    corr = m.correction
    out = {}
    for name, field in ((COEFFICIENTS, "coefficients"), (BLEND, "blend"), (TREND, "cache_trend"),
                        (TREND2, "cache_trend2")):
        recorded = np.asarray(getattr(corr, field) or np.zeros(n), np.float64)  # () : no such table, zeros
        table = facts.tables.get(name)
        if table is None:
            table = np.zeros(n)
        elif table.shape != (n,):
            raise UserError(f"{folder}: {file}'s {name} has shape {list(table.shape)}, sampling.n_steps is {n}")
        if name in facts.tables:  # the manifest's numbers rounded as the graph stores them: equal
            dtype = _ROUNDING.get(facts.dtypes[name])
            same = recorded.astype(dtype).astype(np.float64) == table if dtype else \
                np.isclose(recorded, table, rtol=1e-2, atol=0)
        else:
            same = recorded == 0
        differs = np.flatnonzero(~same)
        if differs.size:
            i = int(differs[0])
            held = f"holds {table[i]:.6g}" if name in facts.tables else "has no such table (all zeros)"
            raise UserError(f"{folder}: correction.{field}[{i}] is {recorded[i]:.6g}, {file} {held} ({name})")
        out[name] = table
    f = corr.filter
    wants_masks = (f.low_rho is not None or f.high_rho is not None) and corr.filter_hw is not None
    shape = facts.shapes.get(MASKS)
    if wants_masks != (shape is not None):
        raise UserError(f"{folder}: correction.filter is {f.name!r}{' on ' + str(list(corr.filter_hw)) if wants_masks else ''}"
                        f", but {file} has {'no filter masks' if shape is None else 'filter masks'} ({MASKS})")
    if shape is not None and tuple(shape) != (n, *corr.filter_hw):
        raise UserError(f"{folder}: {file}'s {MASKS} has shape {list(shape)}, the manifest's steps and "
                        f"correction.filter_hw give {[n, *corr.filter_hw]}")
    return out


def check_graphs(manifest: Manifest, full: str | Path, cache: str | Path, timesteps=None) -> None:
    """Refuse (UserError, one line) a manifest whose IO, schedule, sampling or correction does not
    describe the hashed graphs `full` and `cache` (ONNX files of the folder). `timesteps`: those the
    runtime's scheduler gives (None: the manifest's are used unchecked)."""
    m, folder = manifest, manifest.folder
    full, cache = Path(full), Path(cache)
    full_facts = _read(m, full, full.name)
    _check_io(folder, "full", full.name, m.graphs["full"], full_facts)
    facts = _read(m, cache, cache.name, tables={COEFFICIENTS, BLEND, TREND, TREND2}, shape_only={MASKS})
    _check_io(folder, "cache", cache.name, m.graphs["cache"], facts)
    _check_embedded(folder, m, cache.name, facts.metadata)
    recorded = np.asarray(m.timesteps, np.float64)
    if timesteps is not None:
        given = np.asarray(timesteps, np.float64).ravel()
        if given.shape != recorded.shape:
            raise UserError(f"{folder}: the scheduler gives {given.size} timesteps, the manifest has {recorded.size}")
        differs = np.flatnonzero(~np.isclose(given, recorded, rtol=1e-6, atol=1e-6))
        if differs.size:
            i = int(differs[0])
            raise UserError(f"{folder}: timesteps[{i}] is {recorded[i]:.6g}, but this runtime's scheduler gives "
                            f"{given[i]:.6g} for sampling.scheduler and n_steps (a changed scheduler config, or a "
                            "diffusers version that schedules differently)")
    tables = _check_tables(folder, m, cache.name, facts)
    schedule = np.array(m.schedule.full, bool)
    for disagreement in (lambda f: schedule_disagreement(f, recorded, m.correction.gammas, tables, cache.name),
                         lambda f: ratios_disagreement(f, recorded, m.correction.ratios)):  # the graph, then the record
        found = disagreement(schedule)
        if found is None:
            continue
        step, why = found
        k = _explain(schedule, disagreement)
        if k is not None:
            raise UserError(f"{folder}: schedule.full[{k}] is {_kind(schedule[k])}, but the export was made with "
                            f"step {k} {_kind(not schedule[k])} ({why})")
        raise UserError(f"{folder}: the schedule does not match the export at step {step}: {why}")
