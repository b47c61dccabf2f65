"""Small trained reference DiTs (8x8 digits), so sampling trajectories and cache quality mean something.

Random-weight zoo models have no meaningful trajectory; these three are trained on scikit-learn's
bundled digits (1797 8x8 images, 10 classes) by `tools/train_reference.py`, which writes
`weights/<name>.safetensors` (fp16) and `weights/<name>.json` (everything to rebuild and sample):

- `dit-digits`: class-conditional `DiTTransformer2DModel` (ada_norm_zero, 10 classes + null class 10),
  ε-prediction, DDPM noise schedule (1000 steps, linear betas), DDIM sampling, no learned sigma.
- `pixart-digits`: `PixArtTransformer2DModel` conditioned on a fixed random "caption" per class
  (8 tokens x 32, seeded, stored with the weights; zeros are the null caption), rectified flow,
  `FlowMatchEulerDiscreteScheduler`.
- `latte-digits`: `LatteTransformer3DModel` on 4-frame clips of a digit rolling one pixel per frame to
  the right (wrapping around the 8x8 canvas), same caption conditioning, rectified flow.

Latents are the images themselves, 1 channel in [-1, 1]. The models are zoo-style subclasses of
the diffusers classes (forward takes positional tensors in `input_names` order, returns the sample),
so `export_reference` exports them like `export_family`. Conditioning arrays are in the `--calib`
npz format (`write_calib_npz`), and `sample_torch` runs the project's own sampling loop
(`omnicache_export.sampler.sample`) with the torch model, so the ONNX runtime's samples compare
one to one.

    from omnicache_export.zoo.reference import load_reference, digit_classifier
    ref = load_reference("dit-digits")
    x = ref.sample_torch(np.arange(10), seed=0)          # [10, 1, 8, 8]
    digit_classifier().predict(ref.digits(x)[:, 0])      # -> 0..9
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DiTTransformer2DModel, LatteTransformer3DModel, PixArtTransformer2DModel
from torch import nn

from .families import OUTPUT_NAME, Family, Input, positional

WEIGHTS_DIR = Path(__file__).with_name("weights")
NUM_CLASSES = 10
NULL_CLASS = 10  # DiT's label table has a 11th row (the null class) for classifier-free guidance
TEXT_LEN, TEXT_DIM = 8, 32  # caption-like conditioning: 8 tokens x 32 channels per class
CAPTION_SEED = 20240811
FRAMES = 4
CAPTION_KEY = "reference.captions"  # [NUM_CLASSES + 1, TEXT_LEN, TEXT_DIM]; the last row is the null caption

# The scheduler the DDPM-trained model was trained with (diffusers DDPMScheduler defaults, made explicit).
DDPM_TRAIN = {
    "_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_schedule": "linear",
    "beta_start": 0.0001, "beta_end": 0.02, "prediction_type": "epsilon", "clip_sample": False,
}
DDIM = {
    "_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_schedule": "linear",
    "beta_start": 0.0001, "beta_end": 0.02, "prediction_type": "epsilon", "clip_sample": False,
    "set_alpha_to_one": False, "steps_offset": 1, "timestep_spacing": "leading",
}
FLOW_EULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.0}


@dataclasses.dataclass(frozen=True)
class ReferenceSpec:
    """A reference model's architecture and sampling defaults (the trained JSON config may refine them)."""

    name: str
    kind: str  # dit | pixart | latte
    base: type[nn.Module]
    model_config: dict[str, Any]
    input_names: tuple[str, ...]
    objective: str  # "epsilon" (DDPM) | "flow" (rectified flow, target noise - x0)
    scheduler: dict[str, Any]
    steps: int
    guidance_scale: float
    latent_shape: tuple[int, ...]  # one sample: [C, H, W] or [C, F, H, W]
    notes: str = ""

    @property
    def weights_path(self) -> Path:
        return WEIGHTS_DIR / f"{self.name}.safetensors"

    @property
    def config_path(self) -> Path:
        return WEIGHTS_DIR / f"{self.name}.json"

    @property
    def frames(self) -> int:
        return self.latent_shape[1] if len(self.latent_shape) == 4 else 1

    @property
    def caption(self) -> bool:
        return "encoder_hidden_states" in self.input_names


REFERENCES: dict[str, ReferenceSpec] = {
    spec.name: spec
    for spec in (
        ReferenceSpec(
            name="dit-digits", kind="dit", base=DiTTransformer2DModel,
            model_config=dict(num_attention_heads=4, attention_head_dim=24, in_channels=1, out_channels=1,
                              num_layers=4, sample_size=8, patch_size=2, num_embeds_ada_norm=NUM_CLASSES),
            input_names=("hidden_states", "timestep", "class_labels"),
            objective="epsilon", scheduler=DDIM, steps=25, guidance_scale=2.0, latent_shape=(1, 8, 8),
            notes="class-conditional DiT (ada_norm_zero), eps-prediction, no learned sigma; null class 10",
        ),
        ReferenceSpec(
            name="pixart-digits", kind="pixart", base=PixArtTransformer2DModel,
            model_config=dict(num_attention_heads=4, attention_head_dim=24, in_channels=1, out_channels=1,
                              num_layers=4, cross_attention_dim=96, sample_size=8, patch_size=2,
                              caption_channels=TEXT_DIM, use_additional_conditions=False),
            input_names=("hidden_states", "encoder_hidden_states", "timestep"),
            objective="flow", scheduler=FLOW_EULER, steps=20, guidance_scale=2.0, latent_shape=(1, 8, 8),
            notes="PixArt-alpha (ada_norm_single, cross-attention to a fixed random caption per class), "
                  "rectified flow, Euler; null caption = zeros",
        ),
        ReferenceSpec(
            name="latte-digits", kind="latte", base=LatteTransformer3DModel,
            model_config=dict(num_attention_heads=4, attention_head_dim=16, in_channels=1, out_channels=1,
                              num_layers=3, cross_attention_dim=64, sample_size=8, patch_size=2,
                              norm_type="ada_norm_single", activation_fn="gelu-approximate",
                              num_embeds_ada_norm=1000, caption_channels=TEXT_DIM, video_length=FRAMES),
            input_names=("hidden_states", "timestep", "encoder_hidden_states"),
            objective="flow", scheduler=FLOW_EULER, steps=20, guidance_scale=2.0,
            latent_shape=(1, FRAMES, 8, 8),
            notes="Latte (spatial and temporal blocks alternate) on [B, 1, 4, 8, 8] clips of a digit rolling "
                  "1 px per frame to the right (wrapping); caption conditioning like PixArt; rectified flow",
        ),
    )
}


# --- data -----------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    images = (data.images.astype(np.float32) / 8.0 - 1.0)[:, None]  # [1797, 1, 8, 8] in [-1, 1]
    return images, data.target.astype(np.int64)


def digit_images() -> tuple[np.ndarray, np.ndarray]:
    """The real digits as the models see them: images [1797, 1, 8, 8] in [-1, 1] and labels [1797]."""
    images, labels = _digits()
    return images.copy(), labels.copy()


# Motion of the latte clips: frame f is the digit rolled by f pixels along (axis, sign).
MOTIONS = ((-1, 1), (-1, -1), (-2, 1), (-2, -1))  # right, left, down, up
# The latte reference trains on rightward motion only: with all four, 12 min of CPU training gave good first
# frames (97.5 % classified) but frames 2-3 lost the digit (65-73 %): 82 % over all frames at guidance 4.
TRAIN_MOTIONS = (0,)


def make_clips(images: np.ndarray, motions: np.ndarray, frames: int = FRAMES) -> np.ndarray:
    """Clips [N, 1, F, 8, 8] from images [N, 1, 8, 8]: frame f = the digit rolled f pixels (MOTIONS[m])."""
    out = np.empty((len(images), images.shape[1], frames, *images.shape[2:]), dtype=images.dtype)
    for m, (axis, sign) in enumerate(MOTIONS):
        pick = motions == m
        for f in range(frames):
            out[pick, :, f] = np.roll(images[pick], sign * f, axis=axis)
    return out


def caption_table(seed: int = CAPTION_SEED) -> np.ndarray:
    """[NUM_CLASSES + 1, TEXT_LEN, TEXT_DIM] float32: a fixed N(0, 1) "caption" per class, then zeros (null)."""
    rng = np.random.default_rng(seed)
    table = np.zeros((NUM_CLASSES + 1, TEXT_LEN, TEXT_DIM), dtype=np.float32)
    table[:NUM_CLASSES] = rng.standard_normal((NUM_CLASSES, TEXT_LEN, TEXT_DIM), dtype=np.float32)
    return table


# --- models ---------------------------------------------------------------------------------------


def build_model(spec: ReferenceSpec, model_config: dict[str, Any] | None = None, seed: int = 0) -> nn.Module:
    """A fresh (random-weight) zoo-style positional subclass of the spec's diffusers class."""
    cls = positional(spec.base, list(spec.input_names))
    torch.manual_seed(seed)
    model = cls(**(model_config or spec.model_config))
    if spec.kind == "dit":
        # Each DiT block has its own label embedder with 10 % label dropout in train mode, drawn per block:
        # a whole-model null class would almost never be seen. The trainer drops labels itself (all blocks
        # at once); the table keeps its 11th (null) row.
        for module in model.modules():
            if hasattr(module, "dropout_prob") and hasattr(module, "embedding_table"):
                module.dropout_prob = 0.0
    return model


def _family(spec: ReferenceSpec, model: nn.Module) -> Family:
    inputs = {
        "hidden_states": Input(tuple(spec.latent_shape)),
        "timestep": Input((), kind="timestep"),
        "class_labels": Input((), kind="labels", high=NUM_CLASSES),
        "encoder_hidden_states": Input((TEXT_LEN, TEXT_DIM)),
    }
    return Family(name=spec.name, build=lambda seed=0: model, input_names=list(spec.input_names),
                  inputs={n: inputs[n] for n in spec.input_names}, notes=spec.notes)


@dataclasses.dataclass
class Reference:
    """A loaded reference model (eval mode, fp32) with its conditioning and sampling defaults."""

    spec: ReferenceSpec
    model: nn.Module
    config: dict[str, Any]  # the trained JSON config
    captions: np.ndarray | None  # [NUM_CLASSES + 1, TEXT_LEN, TEXT_DIM] for caption-conditioned models

    name = property(lambda self: self.spec.name)
    kind = property(lambda self: self.spec.kind)
    input_names = property(lambda self: list(self.spec.input_names))
    output_name = OUTPUT_NAME
    latent_shape = property(lambda self: list(self.config.get("latent_shape", self.spec.latent_shape)))
    scheduler = property(lambda self: dict(self.config.get("scheduler", self.spec.scheduler)))
    steps = property(lambda self: int(self.config.get("steps", self.spec.steps)))
    guidance_scale = property(lambda self: float(self.config.get("guidance_scale", self.spec.guidance_scale)))
    objective = property(lambda self: self.config.get("objective", self.spec.objective))
    frames = property(lambda self: self.spec.frames)

    @property
    def family(self) -> Family:
        """A zoo `Family` around this model (input specs, dynamic batch axes) for the zoo's exporters."""
        return _family(self.spec, self.model)

    def conditioning(self, labels) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(cond, uncond) arrays for class labels, keyed by ONNX input name, sample axis first."""
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
            raise ValueError(f"labels must be in 0..{NUM_CLASSES - 1}")
        if self.spec.caption:
            cond = {"encoder_hidden_states": self.captions[labels]}
            uncond = {"encoder_hidden_states": np.repeat(self.captions[NULL_CLASS][None], len(labels), axis=0)}
        else:
            cond = {"class_labels": labels.copy()}
            uncond = {"class_labels": np.full_like(labels, NULL_CLASS)}
        return cond, uncond

    def sampling_spec(self, steps: int | None = None, guidance: float | None = None):
        from omnicache_export.runtime.sampler import SamplingSpec

        return SamplingSpec(
            scheduler=self.scheduler, n_steps=int(steps or self.steps), latent="hidden_states",
            timestep="timestep", output=OUTPUT_NAME, latent_shape=self.latent_shape,
            guidance_scale=float(self.guidance_scale if guidance is None else guidance),
        )

    @torch.no_grad()
    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """The torch model on a feed dict keyed by input name (like an ONNX session)."""
        args = [torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in self.input_names]
        return self.model(*args).numpy()

    def sample_torch(self, labels, steps: int | None = None, seed: int = 0, guidance: float | None = None,
                     record: bool = False):
        """Samples [N, *latent_shape] for class labels, with the default sampler (or `steps`, `guidance`),
        through the project's sampling loop; with `record`, also the trajectory [N, steps+1, ...]."""
        from omnicache_export.runtime.sampler import sample

        cond, uncond = self.conditioning(labels)
        spec = self.sampling_spec(steps, guidance)
        x, traj = sample(spec, lambda i, feeds: self.run(feeds), cond, uncond, len(cond[next(iter(cond))]), seed,
                         record=record)
        return (x, traj) if record else x

    def digits(self, latents: np.ndarray) -> np.ndarray:
        """The digits in samples: [N, F, 1, 8, 8] (F = 1 for images); latte frames are rolled back to the
        digit's position in frame 0, each along the motion that best matches frame 0."""
        return to_digits(latents)

    def example_inputs(self, labels=(3, 7), seed: int = 0) -> dict[str, np.ndarray]:
        """Feeds for one model call: noisy latents, distinct timesteps, the labels' conditioning."""
        rng = np.random.default_rng(seed)
        cond, _ = self.conditioning(labels)
        n = len(labels)
        feeds = {"hidden_states": rng.standard_normal((n, *self.latent_shape), dtype=np.float32),
                 "timestep": rng.uniform(0, 1000, n).astype(np.float32), **cond}
        return {k: feeds[k] for k in self.input_names}


def to_digits(latents: np.ndarray) -> np.ndarray:
    x = np.asarray(latents, dtype=np.float32)
    if x.ndim == 4:  # [N, C, H, W]
        return x[:, None]
    frames = np.moveaxis(x, 2, 1)  # [N, F, C, H, W]
    out = frames.copy()
    for f in range(1, frames.shape[1]):
        cands = np.stack([np.roll(frames[:, f], -sign * f, axis=axis) for axis, sign in MOTIONS], axis=1)
        err = ((cands - frames[:, :1]) ** 2).reshape(len(x), len(MOTIONS), -1).sum(-1)
        out[:, f] = cands[np.arange(len(x)), err.argmin(1)]
    return out


@functools.lru_cache(maxsize=None)
def _load_cached(name: str, weights_dir: str) -> Reference:
    from safetensors.torch import load_file

    spec = REFERENCES[name]
    folder = Path(weights_dir)
    wpath, cpath = folder / spec.weights_path.name, folder / spec.config_path.name
    if not wpath.is_file() or not cpath.is_file():
        raise FileNotFoundError(f"{wpath} / {cpath} missing: train with `python tools/train_reference.py "
                                f"{spec.kind}`")
    config = json.loads(cpath.read_text())
    tensors = load_file(str(wpath))
    captions = tensors.pop(CAPTION_KEY, None)
    model = build_model(spec, config.get("model_config"))
    model.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=True)
    model.eval().requires_grad_(False)
    return Reference(spec, model, config, None if captions is None else captions.float().numpy())


def load_reference(name: str, weights_dir: str | Path | None = None) -> Reference:
    """The trained reference model `name` (a key of REFERENCES), in eval mode, fp32. Cached per process
    (the torch model is shared: don't train it)."""
    if name not in REFERENCES:
        raise KeyError(f"unknown reference {name!r}; one of {', '.join(REFERENCES)}")
    return _load_cached(name, str(Path(weights_dir or WEIGHTS_DIR).resolve()))


def save_reference(spec: ReferenceSpec, model: nn.Module, config: dict[str, Any], folder: str | Path,
                   captions: np.ndarray | None = None) -> tuple[Path, Path]:
    """Write fp16 weights (+ the caption table, fp32) and the JSON config; returns both paths."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    if captions is not None:
        tensors[CAPTION_KEY] = torch.from_numpy(np.ascontiguousarray(captions, dtype=np.float32))
    wpath, cpath = folder / spec.weights_path.name, folder / spec.config_path.name
    save_file(tensors, str(wpath), metadata={"name": spec.name, "format": "pt"})
    wpath.chmod(0o644)
    cpath.write_text(json.dumps(config, indent=1, default=float) + "\n")
    _load_cached.cache_clear()
    return wpath, cpath


def write_calib_npz(name: str, labels, path: str | Path, weights_dir: str | Path | None = None) -> Path:
    """Conditioning for `labels` in the `--calib` / `--inputs` npz format (uncond/<name> for guidance)."""
    from omnicache_export.runtime.conditioning import UNCOND

    cond, uncond = load_reference(name, weights_dir).conditioning(labels)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **cond, **{UNCOND + k: v for k, v in uncond.items()})
    return path


def scheduler_json(name: str, path: str | Path, weights_dir: str | Path | None = None) -> Path:
    """The reference's scheduler config as a file for `--scheduler FILE.json`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(load_reference(name, weights_dir).scheduler, indent=1) + "\n")
    return path


def export_reference(name: str, path: str | Path, exporter: str = "torchscript", opset: int | None = None,
                     external_data: bool = False, weights_dir: str | Path | None = None) -> Path:
    """Export the trained reference `name` to ONNX with the export helper (dynamic batch); returns the path."""
    from .export import export_zoo_model

    ref = load_reference(name, weights_dir)
    return export_zoo_model(ref.family, ref.model, ref.example_inputs(), path, exporter, opset, external_data)


# --- digit classifier -----------------------------------------------------------------------------


class DigitClassifier:
    """An RBF SVC on the real digits' 64 pixels (scaled to [-1, 1] like the models' data).

    `features(images)`: by default the 64-d PCA rotation of the pixels fitted on the real digits
    (an orthogonal map, so a Fréchet distance on it is the pixel-space one; noise and blur show);
    `kind="classifier"`: the SVC's 10-d one-vs-rest decision function (semantic, class-level).
    """

    def __init__(self):
        from sklearn.svm import SVC

        images, labels = _digits()
        x = images.reshape(len(images), -1).astype(np.float64)
        self.svc = SVC(C=10.0, gamma="scale", decision_function_shape="ovr").fit(x, labels)
        # PCA by eigendecomposition of the 64x64 covariance (sklearn's PCA is slow on a busy box), with
        # each component's sign fixed (largest entry positive) so features are deterministic.
        self.mean = x.mean(0)
        evals, evecs = np.linalg.eigh(np.cov(x - self.mean, rowvar=False))
        order = np.argsort(evals)[::-1]
        comps = evecs[:, order].T
        comps *= np.sign(comps[np.arange(64), np.abs(comps).argmax(1)])[:, None]
        self.components, self.explained_variance = comps, evals[order]

    @staticmethod
    def _flat(images: np.ndarray) -> np.ndarray:
        x = np.asarray(images, dtype=np.float64)
        if x.shape[-2:] != (8, 8) and x.shape[-1] != 64:
            raise ValueError(f"expected images [..., 8, 8] or [..., 64], got {x.shape}")
        return x.reshape(-1, 64)

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Labels [N] for images [N, 1, 8, 8] (or [N, 8, 8], [N, 64]) in [-1, 1]."""
        return self.svc.predict(self._flat(images)).astype(np.int64)

    def features(self, images: np.ndarray, kind: str = "pca") -> np.ndarray:
        x = self._flat(images)
        if kind == "pca":
            return (x - self.mean) @ self.components.T
        if kind == "classifier":
            return self.svc.decision_function(x)
        raise ValueError(f"kind must be 'pca' or 'classifier', got {kind!r}")

    def accuracy(self, images: np.ndarray, labels) -> float:
        return float((self.predict(images) == np.asarray(labels).reshape(-1)).mean())


@functools.lru_cache(maxsize=1)
def digit_classifier() -> DigitClassifier:
    """The (deterministic, cached) digit classifier; fits in well under a second."""
    return DigitClassifier()


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to feature sets a [N, D] and b [M, D]:
    |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^1/2), the trace term from the eigenvalues of S1 S2 (real and
    non-negative for PSD S1, S2; constant features such as the digits' always-blank pixels are fine)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    root_trace = np.sqrt(np.clip(np.linalg.eigvals(s1 @ s2).real, 0.0, None)).sum()
    return float(max(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * root_trace, 0.0))
