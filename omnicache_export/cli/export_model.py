"""`omnicache-export export-model FOLDER -o MODEL.onnx`: a diffusers transformer saved with
`save_pretrained` (a pipeline folder with `--subfolder transformer`, or the model's own folder) to
ONNX, through `export_transformer` and its fixes."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from omnicache_export.cli import args as common
from omnicache_export.errors import UserError

DEFAULT_TEXT_LEN = 16  # prompt tokens of the sample input where the config names no length


def register(verbs, parents: list[argparse.ArgumentParser]) -> None:
    p = verbs.add_parser("export-model", parents=parents,
                         help="export a diffusers transformer (save_pretrained folder) to ONNX with the fixes it needs",
                         description="Export a diffusers DiT saved with save_pretrained to ONNX (either torch "
                                     "exporter; dynamic batch; the diffusers config in the metadata), ready for the "
                                     "main job. Sample inputs come from the model's config (DiT, PixArt, SD3, Latte) "
                                     "or from --sample-inputs.")
    p.add_argument("folder", type=Path, help="the folder save_pretrained wrote (config.json + weights), or a "
                   "pipeline folder with --subfolder")
    p.add_argument("--subfolder", metavar="NAME", help="the model's folder inside FOLDER, e.g. transformer "
                   "(default: FOLDER itself)")
    common.add_output_options(p, "the ONNX file to write (its weights beside it as MODEL.onnx.data past 2 GB; "
                              "written under a temporary name, renamed at the end)", "MODEL.onnx")
    p.add_argument("--exporter", choices=["torchscript", "dynamo"], default="torchscript",
                   help="torch's ONNX exporter (default: torchscript)")
    p.add_argument("--opset", type=int, help="ONNX opset (default: 17 for torchscript, 18 for dynamo, its minimum)")
    p.add_argument("--sample-inputs", type=Path, metavar="FILE.npz",
                   help="sample inputs keyed by forward-argument name, the latent first (default: made from the config)")
    p.add_argument("--batch", type=int, default=2, help="batch of the sample inputs made from the config (default: 2; "
                   "a batch of 1 lets the exporters fix it)")
    p.add_argument("--latent-shape", metavar="C,H,W", help="one sample's latent (default: from the config's "
                   "in_channels and sample_size)")
    p.add_argument("--text-len", type=int, help=f"prompt tokens of the sample (default: the config's maximum, else "
                   f"{DEFAULT_TEXT_LEN})")
    p.add_argument("--static-batch", action="store_true", help="keep the batch fixed (default: dynamic)")
    p.add_argument("--external-data", choices=["auto", "on", "off"], default="auto",
                   help="weights in MODEL.onnx.data (default: auto, past 2 GB)")
    p.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    import warnings

    from omnicache_export import outputs

    folder = a.folder / a.subfolder if a.subfolder else a.folder
    common.input_folder(a.folder, "a model folder")
    if not folder.is_dir():
        raise UserError(f"{folder}: no such folder")
    config = _read_config(folder)
    if a.batch < 1:
        raise UserError(f"--batch {a.batch}: must be >= 1")
    common.input_file(a.sample_inputs, "an .npz of sample inputs")
    external = {"auto": None, "on": True, "off": False}[a.external_data]
    outputs.check_output_file(a.output, force=a.force, inputs=[folder])  # before any work
    from omnicache_export.integrations.export_transformer import check_exporter, export_transformer

    check_exporter(a.exporter, a.opset)
    model = _load_model(folder, config)
    if a.sample_inputs:
        sample = _read_npz(a.sample_inputs)
    else:
        sample = sample_inputs(config, a.batch, common.parse_ints(a.latent_shape, "--latent-shape"), a.text_len)
    with warnings.catch_warnings():  # the exporters' tracer chatter is not the user's concern
        warnings.simplefilter("ignore")
        path = export_transformer(model, sample, a.output, exporter=a.exporter, opset=a.opset,
                                  dynamic_batch=not a.static_batch, external_data=external, force=a.force)
    if not getattr(a, "quiet", False):
        print(f"wrote {path} ({config['_class_name']}, {a.exporter} exporter; inputs: {', '.join(sample)})")
    return 0


def _read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise UserError(f"{folder}: no config.json (not a folder save_pretrained wrote; a pipeline folder needs "
                        "--subfolder transformer)")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not a JSON config ({exc})") from None
    if not isinstance(config, dict) or "_class_name" not in config:
        raise UserError(f"{path}: no _class_name (not a diffusers model config)")
    return config


def _load_model(folder: Path, config: dict):
    import diffusers

    cls = getattr(diffusers, config["_class_name"], None)
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise UserError(f"{folder}: {config['_class_name']!r} is not a diffusers model class")
    try:
        return cls.from_pretrained(str(folder)).eval()
    except (OSError, ValueError, RuntimeError) as exc:
        raise UserError(f"{folder}: cannot load {config['_class_name']} ({str(exc).splitlines()[0][:300]})") from None


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (ValueError, OSError, EOFError) as exc:
        raise UserError(f"{path}: not a readable .npz file ({exc})") from None


def sample_inputs(config: dict, batch: int, latent_shape: list[int] | None, text_len: int | None) -> dict:
    """Sample forward arguments for the diffusers classes whose inputs follow from their config."""
    name = config["_class_name"]
    rng = np.random.default_rng(0)
    size = config.get("sample_size") or 32
    size = size if isinstance(size, int) else size[0]
    latent = latent_shape or [config.get("in_channels", 4), size, size]
    if name == "LatteTransformer3DModel" and not latent_shape:
        latent = [latent[0], config.get("video_length", 16), size, size]
    tokens = text_len or next((config[k] for k in ("max_text_seq_length", "max_sequence_length", "text_len")
                               if isinstance(config.get(k), int)), DEFAULT_TEXT_LEN)
    randn = lambda *shape: rng.standard_normal((batch, *shape), dtype=np.float32)  # noqa: E731
    timestep = rng.uniform(0, 1000, batch).astype(np.float32)
    if name == "DiTTransformer2DModel":
        labels = rng.integers(0, int(config.get("num_embeds_ada_norm") or 1000), batch, dtype=np.int64)
        return {"hidden_states": randn(*latent), "timestep": timestep, "class_labels": labels}
    if name == "PixArtTransformer2DModel":
        sample = {"hidden_states": randn(*latent), "encoder_hidden_states": randn(tokens, config["caption_channels"]),
                  "timestep": timestep}
        if config.get("use_additional_conditions", config.get("sample_size") == 128):
            height, width = latent[-2] * 8, latent[-1] * 8
            sample["added_cond_kwargs"] = {"resolution": np.tile(np.float32([height, width]), (batch, 1)),
                                           "aspect_ratio": np.full((batch, 1), height / width, np.float32)}
        else:
            sample["added_cond_kwargs"] = {"resolution": None, "aspect_ratio": None}
        return sample
    if name == "SD3Transformer2DModel":
        return {"hidden_states": randn(*latent), "encoder_hidden_states": randn(tokens, config["joint_attention_dim"]),
                "pooled_projections": randn(config["pooled_projection_dim"]), "timestep": timestep}
    if name == "LatteTransformer3DModel":
        return {"hidden_states": randn(*latent), "timestep": timestep,
                "encoder_hidden_states": randn(tokens, config["caption_channels"])}
    raise UserError(f"no sample inputs are made for {name} from its config: give --sample-inputs FILE.npz "
                    "(forward-argument name -> array, the latent first), or call omnicache_export.export_transformer")
