"""Sampling with diffusers schedulers around an ONNX model: the loop calibration and the runtime share.

The model is anything that maps a feed dict to its raw output (an engine, or the runtime's
full/cache dispatch). The loop handles ε, v and flow outputs (the scheduler's own convention),
learned-sigma outputs (2C channels, the first C are the prediction) and classifier-free guidance
(cond and uncond batched: first half cond, second half uncond).
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from omnicache_export.errors import UserError

SCHEDULER_PRESETS: dict[str, tuple[str, dict]] = {
    "ddim": ("DDIMScheduler", {"clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "euler": ("EulerDiscreteScheduler", {}),
    "flow-euler": ("FlowMatchEulerDiscreteScheduler", {}),
}


def scheduler_config(spec: str, prediction_type: str | None = None) -> dict:
    """A diffusers scheduler config (with `_class_name`) from a preset name or a scheduler_config.json."""
    if spec in SCHEDULER_PRESETS:
        name, extra = SCHEDULER_PRESETS[spec]
        config = {"_class_name": name, **extra}
    else:
        path = Path(spec)
        if not path.is_file():
            raise UserError(f"--scheduler {spec!r}: not one of {', '.join(SCHEDULER_PRESETS)} and no such file")
        try:
            config = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UserError(f"--scheduler {spec}: not a JSON scheduler config ({exc})") from None
        if "_class_name" not in config:
            raise UserError(f"--scheduler {spec}: no _class_name (expected a diffusers scheduler_config.json)")
    if prediction_type and "FlowMatch" not in config["_class_name"]:
        config["prediction_type"] = prediction_type
    return config


def make_scheduler(config: dict):
    import diffusers

    cls = getattr(diffusers, config["_class_name"], None)
    if cls is None or not hasattr(cls, "from_config"):
        raise UserError(f"unknown diffusers scheduler class {config['_class_name']!r}")
    return cls.from_config({k: v for k, v in config.items() if not k.startswith("_")})


@dataclasses.dataclass
class SamplingSpec:
    """Everything that fixes a sampling run besides the model, the inputs and the seed."""

    scheduler: dict  # diffusers config with _class_name
    n_steps: int
    latent: str
    timestep: str | None
    output: str
    latent_shape: list[int]  # one sample, without the batch axis
    timestep_dtype: str = "float32"
    timestep_shape: list | None = None  # the timestep input's shape: [] scalar, [1] shared, else [B]
    latent_dtype: str = "float32"  # float16 exports take float16 latents
    timestep_scale: float = 1.0
    guidance_scale: float = 1.0
    learned_sigma: bool = False
    static_batch: int | None = None  # the model's batch where the export fixed it (guidance included)

    @property
    def cfg(self) -> bool:
        return self.guidance_scale != 1.0

    @property
    def chunk(self) -> int | None:
        """Samples per model call where the batch is static (None: any)."""
        return None if self.static_batch is None else self.static_batch // (2 if self.cfg else 1)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> SamplingSpec:
        return cls(**data)


class Denoiser:
    """One generation's scheduler state: call `step(i, model_output)` in order; `timesteps` is fixed."""

    def __init__(self, spec: SamplingSpec):
        import torch

        self.spec = spec
        self.torch = torch
        self.scheduler = make_scheduler(spec.scheduler)
        self.scheduler.set_timesteps(spec.n_steps)
        self.timesteps = self.scheduler.timesteps.clone()
        if len(self.timesteps) != spec.n_steps:
            raise UserError(f"the scheduler made {len(self.timesteps)} timesteps for --steps {spec.n_steps}")

    def initial_latents(self, n: int, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((n, *self.spec.latent_shape)).astype(np.float32)
        return x * float(getattr(self.scheduler, "init_noise_sigma", 1.0))

    def model_input(self, i: int, x: np.ndarray) -> np.ndarray:
        if hasattr(self.scheduler, "scale_model_input"):
            return self.scheduler.scale_model_input(self.torch.from_numpy(x), self.timesteps[i]).numpy()
        return x

    def timestep_feed(self, i: int, batch: int) -> np.ndarray:
        t = float(self.timesteps[i]) * self.spec.timestep_scale
        shape = self.spec.timestep_shape
        if shape is not None and (len(shape) == 0 or shape == [1]):
            return np.full(shape, t, dtype=np.dtype(self.spec.timestep_dtype))
        return np.full((batch,), t, dtype=np.dtype(self.spec.timestep_dtype))

    def feeds(self, i: int, x: np.ndarray, static: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The model's feeds at step i: conditioning (`static`, from `batched_feeds`), latent, timestep."""
        copies = 2 if self.spec.cfg else 1
        feeds = dict(static)
        feeds[self.spec.latent] = self.latent_feed(i, x, copies)
        if self.spec.timestep:
            feeds[self.spec.timestep] = self.timestep_feed(i, len(x) * copies)
        return feeds

    def latent_feed(self, i: int, x: np.ndarray, copies: int) -> np.ndarray:
        """The model's latent input: scaled x, repeated for guidance, in the model's dtype."""
        x = self.model_input(i, x).astype(self.spec.latent_dtype, copy=False)
        return np.concatenate([x] * copies, axis=0) if copies > 1 else x

    def guided(self, raw: np.ndarray) -> np.ndarray:
        """Prediction from the raw model output: drop learned-sigma channels, apply guidance."""
        c = self.spec.latent_shape[0]
        out = raw[:, :c] if self.spec.learned_sigma else raw
        if self.spec.cfg:
            cond, uncond = np.split(out, 2, axis=0)
            out = uncond + self.spec.guidance_scale * (cond - uncond)
        return out.astype(np.float32)

    def step(self, i: int, prediction: np.ndarray, x: np.ndarray) -> np.ndarray:
        torch = self.torch
        out = self.scheduler.step(torch.from_numpy(prediction), self.timesteps[i], torch.from_numpy(x), return_dict=False)
        return out[0].numpy().astype(np.float32)


def batched_feeds(spec: SamplingSpec, cond: dict[str, np.ndarray], uncond: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Conditioning feeds of one generation: cond then uncond along the batch axis under guidance."""
    if not spec.cfg:
        return dict(cond)
    feeds = {}
    for name, value in cond.items():
        feeds[name] = np.concatenate([value, uncond[name]], axis=0) if name in uncond else value
    return feeds


ModelFn = Callable[[int, dict[str, np.ndarray]], np.ndarray]


def sample(
    spec: SamplingSpec,
    model: ModelFn,
    cond: dict[str, np.ndarray],
    uncond: dict[str, np.ndarray],
    n: int,
    seed: int,
    record: bool = False,
    on_output: Callable[[int, np.ndarray, np.ndarray], np.ndarray] | None = None,
    progress: str | None = None,
    x0: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Run the sampler on n samples. `model(i, feeds)` returns the raw output of step i;
    `on_output(i, raw, x)` may replace it (calibration corrections). Returns the final latents and,
    with `record`, the trajectory [n, N+1, ...]. `progress`: a progress-bar label, or None."""
    from tqdm.auto import tqdm

    den = Denoiser(spec)
    x = den.initial_latents(n, seed) if x0 is None else x0
    static = batched_feeds(spec, cond, uncond)
    trajectory = [x] if record else None
    for i in tqdm(range(spec.n_steps), desc=progress, disable=progress is None, leave=False):
        raw = model(i, den.feeds(i, x, static))
        if on_output is not None:
            raw = on_output(i, raw, x)
        x = den.step(i, den.guided(raw), x)
        if record:
            trajectory.append(x)
    return x, (np.stack(trajectory, axis=1) if record else None)


def chunks(n: int, size: int):
    """(rows, padded rows) of each chunk of `size` samples; the last one padded with its final row."""
    for start in range(0, n, size):
        rows = list(range(start, min(n, start + size)))
        yield rows, rows + [rows[-1]] * (size - len(rows))


def sample_chunked(
    spec: SamplingSpec,
    make_model: Callable[[], ModelFn],
    cond: dict[str, np.ndarray],
    uncond: dict[str, np.ndarray],
    n: int,
    seed: int,
    batched: set[str],
    record: bool = False,
    progress: str | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """`sample` for models whose export fixed the batch: samples go through in chunks of the static
    batch, the last one padded by repeating its final sample. `make_model()` gives each chunk a
    model function with fresh state. The noise is drawn for all n samples at once, as without chunks."""
    size = spec.chunk or n
    x0 = Denoiser(spec).initial_latents(n, seed)
    finals, trajs = [], []
    for rows, padded in chunks(n, size):
        pick = lambda d: {k: (v[padded] if k in batched else v) for k, v in d.items()}  # noqa: E731
        final, traj = sample(spec, make_model(), pick(cond), pick(uncond), size, seed, record, progress=progress,
                             x0=x0[padded])
        finals.append(final[: len(rows)])
        if record:
            trajs.append(traj[: len(rows)])
    return np.concatenate(finals), (np.concatenate(trajs) if record else None)


def timesteps_of(spec: SamplingSpec) -> np.ndarray:
    return Denoiser(copy.deepcopy(spec)).timesteps.numpy().astype(np.float64)
