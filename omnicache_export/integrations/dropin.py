"""`OmniCacheTransformer`: an export folder in place of a diffusers pipeline's `pipe.transformer`.

    pipe.transformer = OmniCacheTransformer.from_export("OUT", pipeline=pipe)

It takes the keywords pipelines pass (hidden_states, timestep, encoder_hidden_states, class_labels,
encoder_attention_mask, pooled_projections, added_cond_kwargs, attention_kwargs ...) and returns what
a diffusers transformer returns (`Transformer2DModelOutput`, or a 1-tuple with return_dict=False).
The pipeline keeps its own loop, scheduler and classifier-free guidance: each call is one model
evaluation on whatever batch comes in (uncond and cond rows together). Which graph runs it comes
from the timestep: the export's schedule belongs to its scheduler and step count, so the timestep
names the step; the first timestep starts a new generation (its own runners and `CacheState`), and
the steps go through `StepDispatch`, the runtime's one dispatch. A pipeline sampling other
timesteps (another step count or scheduler) or another resolution gets one UserError.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from omnicache_export.errors import UserError
from omnicache_export.integrations.export_transformer import NESTED
from omnicache_export.runtime.dispatch import torch_dtype
from omnicache_export.runtime.omnicache import OmniCache

# Keywords pipelines pass that carry no tensor the graph takes when they are None or empty.
_OPTIONAL_KWARGS = ("attention_kwargs", "joint_attention_kwargs", "cross_attention_kwargs")


class MismatchedPipeline(UserError):
    """The pipeline samples other timesteps, another scheduler or another resolution than the export."""


class _Generation:
    """One generation's runners, cache state and next step (the pipeline owns the latents)."""

    def __init__(self, dispatch, rows: int, n_steps: int):
        self.full_runner, self.cache_runner = dispatch.runners()
        self.steps = dispatch.step_indices(n_steps, rows)
        self.rows = rows
        self.state = None
        self.cache_out = None
        self.i = 0
        self.full_steps = self.cached_steps = 0

    def close(self) -> None:
        self.full_runner.close()
        self.cache_runner.close()


class OmniCacheTransformer(torch.nn.Module):
    """An OmniCache export with a diffusers transformer's call signature and attributes.

    `config`: the original model's diffusers config (a FrozenDict, attribute access as pipelines read
    it); `dtype`, `device`: the latent's dtype and the engines' device. `last_steps`: (full, cached)
    graph calls of the latest generation."""

    def __init__(self, runtime: OmniCache, config: Mapping[str, Any], forward_inputs: list[str] | None = None):
        super().__init__()
        from diffusers.configuration_utils import FrozenDict

        self.runtime = runtime
        self.dispatch = runtime.dispatch
        self.spec = runtime.spec
        self.config = FrozenDict(config)
        self._pipeline = None  # `attach`: the pipeline whose scheduler is checked
        self.io = {s.name: s for s in runtime.manifest.model_io.inputs} if runtime.manifest else {}
        names = list(self.io) if self.io else [t.source for t in self.dispatch.full_io.inputs]
        # forward-argument name -> ONNX input name (export_transformer names them alike)
        self.inputs = dict(zip(forward_inputs, names)) if forward_inputs and len(forward_inputs) == len(names) \
            else {n: n for n in names}
        self.model_dtypes = {t.source: torch_dtype(t.dtype) for t in self.dispatch.full_io.inputs}
        # model timestep value of each step (what the pipeline passes: scheduler timestep x scale)
        from omnicache_export.runtime.sampler import timesteps_of

        self.timesteps = timesteps_of(self.spec) * self.spec.timestep_scale
        self._gen: _Generation | None = None
        self.last_steps = (0, 0)

    # ----------------------------------------------------------------- construction

    @classmethod
    def from_export(cls, out_dir: str | Path, backend: str = "onnxruntime", device: str = "cpu", *,
                    config: Mapping[str, Any] | None = None, pipeline=None, precision: str | None = None,
                    **settings) -> OmniCacheTransformer:
        """Load an export (`OmniCache.load`: manifest, hashes, engines). `config`: the original
        model's config (default: the one `export_transformer` wrote into the model's metadata, kept in
        full.onnx). `pipeline`: a diffusers pipeline whose `transformer` it becomes and whose
        scheduler it checks at each generation's start."""
        runtime = OmniCache.load(out_dir, backend=backend, device=device, precision=precision, **settings)
        meta = _export_metadata(runtime)
        config = dict(config) if config is not None else meta.get("config")
        if config is None:
            raise UserError(f"{out_dir}: the export holds no diffusers config (the model was not exported with "
                            "export_transformer): pass config=pipe.transformer.config")
        model = cls(runtime, config, meta.get("inputs"))
        return model.attach(pipeline) if pipeline is not None else model

    def attach(self, pipeline) -> OmniCacheTransformer:
        """Become `pipeline.transformer`, and check its scheduler at each generation's start."""
        pipeline.transformer = self
        self._pipeline = pipeline
        return self

    # ----------------------------------------------------------------- what pipelines read

    @property
    def dtype(self) -> torch.dtype:
        from omnicache_export.runtime.sampler import numpy_to_torch

        return numpy_to_torch(self.spec.latent_dtype)

    @property
    def device(self) -> torch.device:
        return self.dispatch.device

    def to(self, *args, **kwargs):
        """The engines stay where they were loaded (reload with `from_export(device=...)`); a move to
        another device is refused, a dtype change ignored (the graphs fix their dtypes)."""
        for value in (*args, kwargs.get("device")):
            if isinstance(value, (str, torch.device)) and not _is_dtype(value):
                if torch.device(value).type != self.device.type:
                    raise UserError(f"the OmniCache engines run on {self.device}; load the export for "
                                    f"{torch.device(value)} with OmniCacheTransformer.from_export(device=...)")
        return self

    def make_scheduler(self):
        """A fresh diffusers scheduler of the export's own config (class and settings): the one to
        give the pipeline (`pipe.scheduler = drop.make_scheduler()`)."""
        from omnicache_export.runtime.sampler import make_scheduler

        return make_scheduler(self.spec.scheduler)

    # ----------------------------------------------------------------- the call

    def forward(self, hidden_states: torch.Tensor, timestep=None, encoder_hidden_states=None, *,
                return_dict: bool = True, **kwargs):
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        given = dict(kwargs, encoder_hidden_states=encoder_hidden_states)
        for name in _OPTIONAL_KWARGS:
            value = given.pop(name, None)
            if value:
                raise UserError(f"{name}={value!r}: the exported graphs take no attention options")
        for key, value in (given.pop("added_cond_kwargs", None) or {}).items():
            given[f"added_cond_kwargs{NESTED}{key}"] = value  # as export_transformer names its entries
        feeds = self._model_feeds(hidden_states, timestep, given)
        out = self._step(feeds, int(hidden_states.shape[0]), self._step_of(timestep))
        out = out.to(hidden_states.device)
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)

    def _model_feeds(self, latent: torch.Tensor, timestep, given: dict[str, Any]) -> dict[str, torch.Tensor]:
        spec = self.spec
        if list(latent.shape[1:]) != list(spec.latent_shape):
            raise MismatchedPipeline(f"the pipeline's latents are {list(latent.shape[1:])} per sample, the export's "
                                     f"{list(spec.latent_shape)}: the schedule belongs to its resolution (export the "
                                     "transformer at this resolution, or run the pipeline at the export's)")
        if spec.static_batch is not None and latent.shape[0] != spec.static_batch:
            raise MismatchedPipeline(f"the export's batch is fixed at {spec.static_batch} rows (guidance "
                                     f"included), the pipeline passes {latent.shape[0]}")
        feeds = {spec.latent: latent}
        if spec.timestep:
            feeds[spec.timestep] = self._timestep_feed(timestep, int(latent.shape[0]))
        for arg, value in given.items():
            name = self.inputs.get(arg)
            if name is None or name in feeds:
                if value is not None and not _is_all_ones_mask(arg, value):
                    raise UserError(f"the export takes no input {arg!r} (its inputs: {', '.join(self.inputs)}); "
                                    f"export the transformer with {arg!r} in sample_inputs")
                continue
            if value is not None:
                feeds[name] = torch.as_tensor(value)
        missing = [n for n in self.model_dtypes if n not in feeds]
        if missing:
            raise UserError(f"the pipeline passed no {missing[0]!r}, which the export takes")
        return {n: feeds[n].to(device=self.device, dtype=self.model_dtypes[n]).contiguous() for n in self.model_dtypes}

    def _timestep_feed(self, timestep, batch: int) -> torch.Tensor:
        t = torch.as_tensor(timestep)
        shape = self.spec.timestep_shape
        if shape is not None and len(shape) == 0:
            return t.reshape(-1)[0]
        if shape == [1]:
            return t.reshape(-1)[:1]
        return t.reshape(-1).expand(batch) if t.numel() == 1 else t.reshape(batch)

    def _step_of(self, timestep) -> int:
        """The export's step of the pipeline's timestep: the next step of the generation in flight,
        or step 0 (a new generation). Anything else: MismatchedPipeline."""
        if timestep is None:
            raise UserError("the pipeline passed no timestep: the export needs it to find its step")
        values = torch.as_tensor(timestep).detach().reshape(-1).double().cpu().numpy()
        if not np.allclose(values, values[0]):
            raise UserError(f"the rows are at different timesteps ({values.tolist()}): one generation's rows share a step")
        v = float(values[0])
        gen = self._gen
        near = lambda i: bool(np.isclose(v, self.timesteps[i], rtol=1e-6, atol=1e-4))  # noqa: E731
        if gen is not None and gen.i < len(self.timesteps) and near(gen.i):
            return gen.i
        if near(0):
            return 0
        self._check_scheduler()  # names the pipeline's scheduler or step count, where it is known
        where = f"step {gen.i}" if gen is not None and gen.i < len(self.timesteps) else "step 0"
        expected = self.timesteps[gen.i if gen is not None and gen.i < len(self.timesteps) else 0]
        raise MismatchedPipeline(self._mismatch(f"the pipeline's timestep {v:g} is not the export's {where} ({expected:g})"))

    def _mismatch(self, what: str) -> str:
        sched = self.spec.scheduler["_class_name"]
        return (f"{what}: the export's cache schedule belongs to its steps, {self.spec.n_steps} steps of {sched}; "
                f"run the pipeline with that scheduler and num_inference_steps={self.spec.n_steps}, or re-export")

    def _check_scheduler(self) -> None:
        """At a generation's start, where the pipeline is known: its scheduler's class and timesteps."""
        scheduler = getattr(self._pipeline, "scheduler", None)
        if scheduler is None:
            return
        name = type(scheduler).__name__
        if name != self.spec.scheduler["_class_name"]:
            raise MismatchedPipeline(self._mismatch(f"the pipeline samples with {name}"))
        timesteps = getattr(scheduler, "timesteps", None)
        if timesteps is not None and len(timesteps) != self.spec.n_steps:
            raise MismatchedPipeline(self._mismatch(f"the pipeline samples {len(timesteps)} steps"))
        if timesteps is not None and not np.allclose(np.asarray(timesteps, dtype=np.float64) * self.spec.timestep_scale,
                                                     self.timesteps, rtol=1e-6, atol=1e-4):
            raise MismatchedPipeline(self._mismatch("the pipeline's scheduler makes other timesteps"))

    def _step(self, feeds: dict[str, torch.Tensor], rows: int, i: int) -> torch.Tensor:
        d = self.dispatch
        if i == 0 or self._gen is None or self._gen.rows != rows:
            if i != 0:
                raise MismatchedPipeline(self._mismatch(f"the batch changed to {rows} rows in the middle of a generation"))
            self.reset()
            self._check_scheduler()
            self._gen = _Generation(d, rows, self.spec.n_steps)
        gen = self._gen
        if gen.state is None:
            gen.state = d.new_state(gen.full_runner, feeds)
        if self.runtime.full_steps[i]:
            out = d.run_full(gen.full_runner, gen.state, feeds).clone()  # the state's buffer is reused later
            gen.full_steps += 1
        else:
            graph_feeds = d.cache_feeds(i, feeds, gen.state, None, gen.steps)
            if gen.cache_out is None:
                gen.cache_out = {d.output: torch.empty_like(gen.state.prev)}
            d.run_cached(gen.cache_runner, graph_feeds, gen.cache_out)
            out = gen.cache_out[d.output].clone()
            gen.cached_steps += 1
        gen.i = i + 1
        self.last_steps = (gen.full_steps, gen.cached_steps)
        if gen.i == self.spec.n_steps:  # the generation is done: its runners go back now
            self.reset()
        return out

    def reset(self) -> None:
        """Drop the generation in flight (the next call must be at the export's first timestep)."""
        if self._gen is not None:
            self._gen.close()
            self._gen = None

    def close(self) -> None:
        self.reset()
        self.runtime.close()


def _is_dtype(value) -> bool:
    return isinstance(value, torch.dtype)


def _is_all_ones_mask(arg: str, value) -> bool:
    """An attention mask that masks nothing (a pipeline passes one with unpadded prompt embeddings):
    leaving it out of a graph without a mask input changes nothing."""
    if "mask" not in arg or not isinstance(value, torch.Tensor):
        return False
    return bool((value != 0).all()) if value.dtype == torch.bool or not value.is_floating_point() \
        else bool((value == 1).all())


def _export_metadata(runtime: OmniCache) -> dict[str, Any]:
    """The config and forward-input names `export_transformer` put in the source model's metadata,
    as the main job kept them in full.onnx (a graph of the export, hash-checked on load); {} where
    the export has no ONNX graph."""
    from omnicache_export.integrations.export_transformer import read_metadata

    try:
        full, _ = runtime.manifest.engine_paths("onnxruntime")
    except UserError:
        return {}
    return read_metadata(full)


__all__ = ["MismatchedPipeline", "OmniCacheTransformer"]
