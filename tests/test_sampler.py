"""The ONNX sampler equals a plain diffusers loop around the torch model: schedulers, guidance,
learned sigma, timestep conventions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import max_rel_err
from omnicache_export.engines import load_engine
from omnicache_export.engines.base import infer_numpy
from omnicache_export.runtime.sampler import SamplingSpec, make_scheduler, sample, scheduler_config
from omnicache_export.zoo.families import FAMILIES

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def torch_loop(family, config, steps, cond, uncond, guidance, seed, learned_sigma, latent_shape):
    model = family.build(0)
    sch = make_scheduler(config)
    sch.set_timesteps(steps)
    noise = np.random.default_rng([seed, 0]).standard_normal(latent_shape, dtype=np.float32)  # row 0's
    x = torch.from_numpy(noise[None]) * float(
        getattr(sch, "init_noise_sigma", 1.0)
    )
    names = family.input_names
    with torch.no_grad():
        for t in sch.timesteps:
            xin = sch.scale_model_input(x, t) if hasattr(sch, "scale_model_input") else x
            batch = 2 if guidance != 1.0 else 1
            args = []
            for name in names:
                if name == "hidden_states":
                    args.append(torch.cat([xin] * batch))
                elif name == "timestep":
                    args.append(torch.full((batch,), float(t)))
                else:
                    parts = [cond[name]] + ([uncond[name]] if batch == 2 else [])
                    args.append(torch.from_numpy(np.concatenate(parts)))
            out = model(*args)
            if learned_sigma:
                out = out[:, : latent_shape[0]]
            if batch == 2:
                c, u = out.chunk(2)
                out = u + guidance * (c - u)
            x = sch.step(out, t, x, return_dict=False)[0]
    return x.numpy()


@pytest.mark.parametrize(
    "family,scheduler,guidance",
    [("dit", "ddim", 1.0), ("dit", "dpmsolver++", 3.0), ("pixart", "euler", 1.0), ("pixart", "flow-euler", 2.0)],
)
def test_onnx_sampler_matches_diffusers_loop(family, scheduler, guidance, zoo_export):
    fam = FAMILIES[family]
    feeds = fam.example_inputs(1, 0)
    cond = {k: v for k, v in feeds.items() if k not in ("hidden_states", "timestep")}
    uncond = {k: (np.full_like(v, 9) if v.dtype == np.int64 else np.zeros_like(v)) for k, v in cond.items()}
    latent_shape = list(feeds["hidden_states"].shape[1:])
    config = scheduler_config(scheduler)
    spec = SamplingSpec(config, 6, "hidden_states", "timestep", fam.output_name, latent_shape,
                        timestep_dtype=str(feeds["timestep"].dtype), guidance_scale=guidance)
    with load_engine("onnxruntime", zoo_export(family, "torchscript")) as engine:
        learned_sigma = infer_numpy(engine, feeds)[fam.output_name].shape[1] == 2 * latent_shape[0]
        spec.learned_sigma = learned_sigma
        ours, traj = sample(spec, lambda i, f: infer_numpy(engine, f)[fam.output_name], cond, uncond, 1, seed=5,
                            record=True)
    ref = torch_loop(fam, config, 6, cond, uncond, guidance, 5, learned_sigma, latent_shape)
    assert traj.shape == (1, 7, *latent_shape)
    assert max_rel_err(ours, ref) <= 1e-3
    assert np.abs(ours - traj[:, 0]).max() > 0.1  # the sampler really moved
