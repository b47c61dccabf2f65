"""diffusers schedulers on torch tensors: the per-step arithmetic every sampling loop shares.

`Denoiser` holds one generation's scheduler state and turns latents into model feeds and model
outputs into the next latents: ε, v and flow outputs (the scheduler's own convention),
learned-sigma outputs (2C channels, the first C are the prediction) and classifier-free guidance
(cond and uncond batched: first half cond, second half uncond). The runtime's dispatch
(`runtime.generation`) drives it; `sample()` drives it around a plain model function (the torch
reference models and the peer methods of the benchmark).

Initial noise is a function of (seed, row index) alone (`initial_noise`), so a sample is the same
whichever batch it runs in.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from omnicache_export.errors import UserError

if TYPE_CHECKING:
    import torch

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


# Steps a scheduler is asked for, at most: its `num_train_timesteps` (this where it states none).
# A discrete (β-schedule) scheduler cannot make more distinct timesteps than it was trained on; a
# flow scheduler's sigmas are continuous, so its num_train_timesteps is a stated cap there (more
# steps than the model's training discretization only add time; the schedule search and the
# manifest's per-step tables grow with the step count).
DEFAULT_MAX_STEPS = 1000


def max_steps(scheduler) -> int:
    """The most steps `scheduler` is asked for: its num_train_timesteps (DEFAULT_MAX_STEPS without one)."""
    train = getattr(scheduler, "config", {}).get("num_train_timesteps")
    return int(train) if isinstance(train, int) and train > 0 else DEFAULT_MAX_STEPS


def _is_discrete(scheduler) -> bool:
    """A β-schedule scheduler (DDIM, DPM-Solver, Euler ...): it indexes its training timesteps."""
    return getattr(scheduler, "alphas_cumprod", None) is not None


def timesteps_problem(scheduler, n_steps: int) -> str | None:
    """Why the timesteps `scheduler.set_timesteps(n_steps)` made cannot be sampled (None: they can):
    not n_steps of them; for a discrete scheduler, duplicates or one outside [0, num_train_timesteps)."""
    t = scheduler.timesteps
    if len(t) != n_steps:
        return f"it made {len(t)} timesteps"
    if _is_discrete(scheduler):
        train = len(scheduler.alphas_cumprod)
        if float(t.max()) >= train or float(t.min()) < 0:
            return f"its timesteps reach {float(t.max()):g}, outside its {train} training timesteps [0, {train})"
        if len(set(t.tolist())) != len(t):
            return "its timesteps repeat"
    return None


def check_steps(config: dict, n_steps: int, flag: str = "--steps") -> None:
    """Refuse (UserError, one line naming the scheduler) a step count the scheduler cannot sample:
    above `max_steps` (its num_train_timesteps), or timesteps it cannot use (see `timesteps_problem`;
    DDIM with steps_offset 1 takes 999 of its 1000). Run before any work."""
    scheduler = make_scheduler(config)
    name = config["_class_name"]
    limit = max_steps(scheduler)
    reason = (f"it has {limit} training timesteps" if _is_discrete(scheduler)
              else f"a flow scheduler is capped at its num_train_timesteps, {limit}")
    if not 1 <= n_steps <= limit:
        raise UserError(f"{flag} {n_steps}: {name} takes 1 to {limit} steps ({reason})")

    def problem(n: int) -> str | None:
        try:
            scheduler.set_timesteps(n)
        except Exception as exc:  # noqa: BLE001 - diffusers' own refusal, named below
            return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return timesteps_problem(scheduler, n)

    why = problem(n_steps)
    if why is None:
        return
    fits = next((n for n in range(n_steps - 1, max(0, n_steps - 64), -1) if problem(n) is None), None)
    advice = f": use at most {fits}" if fits else ""
    raise UserError(f"{flag} {n_steps}: {name} cannot sample {n_steps} steps ({why}){advice}")


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


def check_seed(seed) -> None:
    """A noise seed is an integer >= 0 (numpy's SeedSequence takes nothing else): UserError otherwise."""
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise UserError(f"seed {seed!r}: must be an integer >= 0")
    if seed < 0:
        raise UserError(f"seed {seed}: must be >= 0")


def initial_noise(spec: SamplingSpec, seed: int, rows: int | Sequence[int]) -> np.ndarray:
    """The initial noise of each row, before the scheduler's `init_noise_sigma`: row r's is
    `numpy.random.default_rng([seed, r]).standard_normal(latent_shape, dtype=float32)`. Drawn on the
    host, so every device and batch size starts from the same latents."""
    check_seed(seed)
    rows = range(rows) if isinstance(rows, int) else rows
    shape = tuple(spec.latent_shape)
    return np.stack([np.random.default_rng([seed, int(r)]).standard_normal(shape, dtype=np.float32) for r in rows])


class Denoiser:
    """One generation's scheduler state on `device`: call `step(i, prediction, x)` in order."""

    def __init__(self, spec: SamplingSpec, device: str | torch.device = "cpu"):
        import torch

        self.spec = spec
        self.torch = torch
        self.device = torch.device(device)
        self.scheduler = make_scheduler(spec.scheduler)
        self.scheduler.set_timesteps(spec.n_steps)
        self.timesteps = self.scheduler.timesteps.clone()
        problem = timesteps_problem(self.scheduler, spec.n_steps)
        if problem:
            raise UserError(f"{spec.scheduler['_class_name']} cannot sample {spec.n_steps} steps ({problem})")
        self._latent_dtype = numpy_to_torch(spec.latent_dtype)  # resolved once: latent_feed runs every step
        self._scales_input = hasattr(self.scheduler, "scale_model_input")
        self._timestep_feeds: dict[int, list] = {}

    def initial_latents(self, rows: int | Sequence[int], seed: int) -> torch.Tensor:
        """x_0 of the given rows (or of rows 0..n-1), on the device (`initial_noise` × init_noise_sigma)."""
        x = self.torch.from_numpy(initial_noise(self.spec, seed, rows)).to(self.device)
        return x * float(getattr(self.scheduler, "init_noise_sigma", 1.0))

    def model_input(self, i: int, x: torch.Tensor) -> torch.Tensor:
        if self._scales_input:
            return self.scheduler.scale_model_input(x, self.timesteps[i])
        return x

    def timestep_feed(self, i: int, batch: int) -> torch.Tensor:
        """The timestep input of step i for a model batch; made once per batch size, on the device."""
        if batch not in self._timestep_feeds:
            shape = self.spec.timestep_shape
            if shape is None or not (len(shape) == 0 or shape == [1]):
                shape = [batch]
            dtype = numpy_to_torch(self.spec.timestep_dtype)
            scale = self.spec.timestep_scale
            self._timestep_feeds[batch] = [
                self.torch.full(shape, float(t) * scale, dtype=dtype, device=self.device) for t in self.timesteps
            ]
        return self._timestep_feeds[batch][i]

    def feeds(self, i: int, x: torch.Tensor, static: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The model's feeds at step i: conditioning (`static`, from `batched_feeds`), latent, timestep."""
        copies = 2 if self.spec.cfg else 1
        feeds = dict(static)
        feeds[self.spec.latent] = self.latent_feed(i, x, copies)
        if self.spec.timestep:
            feeds[self.spec.timestep] = self.timestep_feed(i, len(x) * copies)
        return feeds

    def latent_feed(self, i: int, x: torch.Tensor, copies: int) -> torch.Tensor:
        """The model's latent input: scaled x, repeated for guidance, in the model's dtype."""
        x = self.model_input(i, x).to(self._latent_dtype)
        return self.torch.cat([x] * copies, dim=0) if copies > 1 else x.contiguous()

    def guided(self, raw: torch.Tensor) -> torch.Tensor:
        """Prediction from the raw model output: drop learned-sigma channels, apply guidance (float32)."""
        c = self.spec.latent_shape[0]
        out = (raw[:, :c] if self.spec.learned_sigma else raw).float()
        if self.spec.cfg:
            cond, uncond = out.chunk(2, dim=0)
            out = uncond + self.spec.guidance_scale * (cond - uncond)
        return out

    def step(self, i: int, prediction: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        out = self.scheduler.step(prediction, self.timesteps[i], x, return_dict=False)
        return out[0].float()


def numpy_to_torch(name: str):
    """torch dtype of a numpy dtype name (`float32`, `float16`, `int64` ...)."""
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "float64": torch.float64, "int64": torch.int64,
            "int32": torch.int32, "bool": torch.bool, "uint8": torch.uint8, "int8": torch.int8}[np.dtype(name).name]


def to_torch(arrays: dict[str, np.ndarray], device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    import torch

    return {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in arrays.items()}


def batched_feeds(spec: SamplingSpec, cond: dict, uncond: dict) -> dict:
    """Conditioning feeds of one generation (torch tensors): cond then uncond along the batch axis under guidance."""
    import torch

    if not spec.cfg:
        return {k: v.contiguous() for k, v in cond.items()}
    return {name: (torch.cat([value, uncond[name]], dim=0) if name in uncond else value.contiguous())
            for name, value in cond.items()}


ModelFn = Callable[[int, dict[str, np.ndarray]], np.ndarray]


def sample(
    spec: SamplingSpec,
    model: ModelFn,
    cond: dict[str, np.ndarray],
    uncond: dict[str, np.ndarray],
    n: int,
    seed: int,
    record: bool = False,
    progress: str | None = None,
    rows: Sequence[int] | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Run the sampler around a plain host model function `model(i, feeds) -> raw output` (numpy
    in, numpy out: the torch reference models, the benchmark's peer methods). Rows 0..n-1 of the
    noise (or `rows`). Returns the final latents and, with `record`, the trajectory [n, N+1, ...]."""
    import torch
    from tqdm.auto import tqdm

    den = Denoiser(spec)
    x = den.initial_latents(range(n) if rows is None else rows, seed)
    static = batched_feeds(spec, to_torch(cond), to_torch(uncond))
    trajectory = [x] if record else None
    for i in tqdm(range(spec.n_steps), desc=progress, disable=progress is None, leave=False):
        feeds = {k: v.numpy() for k, v in den.feeds(i, x, static).items()}
        raw = torch.from_numpy(np.asarray(model(i, feeds)))
        x = den.step(i, den.guided(raw), x)
        if record:
            trajectory.append(x)
    final = x.numpy()
    return final, (torch.stack(trajectory, dim=1).numpy() if record else None)


def timesteps_of(spec: SamplingSpec) -> np.ndarray:
    return Denoiser(copy.deepcopy(spec)).timesteps.numpy().astype(np.float64)
