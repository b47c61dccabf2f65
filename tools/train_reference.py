"""Train the reference DiTs of `omnicache_export.zoo.reference` on scikit-learn's 8x8 digits (CPU).

    python tools/train_reference.py {dit,pixart,latte,all} [--minutes M] [--out DIR] [--steps N]

Time-budgeted: trains until --minutes of wall time (or --steps) have passed, with the learning rate on
a warmup + cosine schedule over whichever ends first (progress = max(step / steps, elapsed / budget)),
so a run with --steps and a generous budget is exactly reproducible. Seeds are fixed (--seed). Keeps
an EMA of the weights and saves it (fp16) with a JSON config; then samples 20 digits per class with
the default sampler at a few guidance scales, classifies them with `digit_classifier()`, and stores
the guidance scale that does best (the smallest within 1 point of the best) as the default.

Threads: --threads 1 by default. On this project's shared 2-core machine torch with 2 OpenMP threads
ran 6-20x slower than with 1 whenever another process was busy (spinning threads); pass 2 on an idle box.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from omnicache_export.zoo.reference import (  # noqa: E402
    DDPM_TRAIN, FRAMES, TRAIN_MOTIONS, NULL_CLASS, REFERENCES, WEIGHTS_DIR, Reference, build_model, caption_table,
    digit_classifier, digit_images, make_clips, save_reference, to_digits,
)

KINDS = {"dit": "dit-digits", "pixart": "pixart-digits", "latte": "latte-digits"}
DEFAULTS = {  # batch, lr
    "dit": dict(batch=128, lr=1e-3),
    "pixart": dict(batch=128, lr=1e-3),
    "latte": dict(batch=64, lr=1e-3),
}
GUIDANCE_GRID = (1.0, 1.5, 2.0, 3.0, 4.0)


def log(msg: str) -> None:
    print(msg, flush=True)


class Trainer:
    def __init__(self, kind: str, args):
        self.kind, self.args = kind, args
        self.spec = REFERENCES[KINDS[kind]]
        self.rng = np.random.default_rng(args.seed)
        torch.manual_seed(args.seed)
        self.images, self.labels = digit_images()
        self.captions = caption_table() if self.spec.caption else None
        self.model = build_model(self.spec, seed=args.seed).train()
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        d = DEFAULTS[kind]
        self.batch = args.batch or d["batch"]
        self.lr = args.lr or d["lr"]
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=self.lr, betas=(0.9, 0.99), weight_decay=0.01)
        if self.spec.objective == "epsilon":
            from diffusers import DDPMScheduler

            self.ddpm = DDPMScheduler.from_config({k: v for k, v in DDPM_TRAIN.items() if k[0] != "_"})
            self.alphas = self.ddpm.alphas_cumprod.float()

    # --- one batch ---
    def batch_data(self):
        idx = self.rng.integers(0, len(self.images), self.batch)
        x0 = self.images[idx]
        labels = self.labels[idx].copy()
        if self.kind == "latte":
            x0 = make_clips(x0, self.rng.choice(np.asarray(TRAIN_MOTIONS), self.batch))
        drop = self.rng.random(self.batch) < self.args.cond_drop
        labels[drop] = NULL_CLASS
        return torch.from_numpy(x0), labels

    def cond(self, labels: np.ndarray) -> torch.Tensor:
        if self.captions is not None:
            return torch.from_numpy(self.captions[labels])
        return torch.from_numpy(labels)

    def call(self, model, x, t, cond):
        named = {"hidden_states": x, "timestep": t, "class_labels": cond, "encoder_hidden_states": cond}
        return model(*(named[n] for n in self.spec.input_names))

    def loss(self) -> torch.Tensor:
        x0, labels = self.batch_data()
        cond = self.cond(labels)
        noise = torch.randn_like(x0)
        b = x0.shape[0]
        shape = (b,) + (1,) * (x0.dim() - 1)
        if self.spec.objective == "epsilon":
            t = torch.randint(0, 1000, (b,))
            ab = self.alphas[t].view(shape)
            xt = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
            target = noise
            t_in = t.float()
        else:  # rectified flow: x_s = (1 - s) x0 + s noise, predict noise - x0; the model sees s * 1000
            s = torch.rand(b)
            sv = s.view(shape)
            xt = (1 - sv) * x0 + sv * noise
            target = noise - x0
            t_in = s * 1000.0
        out = self.call(self.model, xt, t_in, cond)
        return torch.nn.functional.mse_loss(out, target)

    @torch.no_grad()
    def update_ema(self, step: int) -> None:
        decay = min(self.args.ema, (1 + step) / (10 + step))
        for e, p in zip(self.ema.parameters(), self.model.parameters()):
            e.lerp_(p, 1 - decay)

    def train(self) -> dict:
        args = self.args
        budget = args.minutes * 60.0
        max_steps = args.steps or math.inf
        t0 = time.time()
        step, losses, curve = 0, [], []
        next_report = 0.0
        while step < max_steps:
            elapsed = time.time() - t0
            if elapsed >= budget:
                break
            progress = max(step / max_steps, elapsed / budget)
            warm = min(1.0, (step + 1) / args.warmup)
            lr = self.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))
            for g in self.opt.param_groups:
                g["lr"] = lr
            loss = self.loss()
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.opt.step()
            self.update_ema(step)
            losses.append(float(loss))
            step += 1
            if elapsed >= next_report or step == max_steps:
                window = float(np.mean(losses[-100:]))
                curve.append([step, round(elapsed, 1), window])
                log(f"  [{self.spec.name}] step {step:6d}  {elapsed:6.0f}s  loss(avg100) {window:.4f}  lr {lr:.2e}")
                next_report += budget / 12
        wall = time.time() - t0
        final = float(np.mean(losses[-200:]))
        log(f"  [{self.spec.name}] done: {step} steps in {wall:.0f}s ({wall / max(step, 1) * 1000:.0f} ms/step), "
            f"final loss (avg of last 200) {final:.4f}")
        return {"steps": step, "wall_s": round(wall, 1), "final_loss": final, "loss_curve": curve}


def evaluate(ref: Reference, per_class: int, seed: int) -> dict:
    """Classifier accuracy of samples (per_class x 10) at each guidance scale in the grid."""
    clf = digit_classifier()
    labels = np.repeat(np.arange(10), per_class)
    out = {}
    for g in GUIDANCE_GRID:
        t = time.time()
        x = ref.sample_torch(labels, seed=seed, guidance=g)
        digits = to_digits(x)  # [N, F, 1, 8, 8]
        pred = clf.predict(digits.reshape(-1, 1, 8, 8)).reshape(len(labels), -1)
        acc = float((pred == labels[:, None]).mean())
        out[str(g)] = {"accuracy": round(acc, 4), "sample_s": round(time.time() - t, 1)}
        if digits.shape[1] > 1:
            out[str(g)]["clip_accuracy"] = round(float((pred == labels[:, None]).all(1).mean()), 4)
        log(f"  [{ref.name}] guidance {g}: classifier accuracy {acc:.3f} ({len(pred.ravel())} digits, "
            f"{ref.steps} steps)")
    return out


def run(kind: str, args) -> dict:
    trainer = Trainer(kind, args)
    spec = trainer.spec
    n_params = sum(p.numel() for p in trainer.model.parameters())
    log(f"== {spec.name}: {spec.base.__name__} {spec.model_config}, {n_params / 1e6:.2f}M params, "
        f"objective {spec.objective}, batch {trainer.batch}, lr {trainer.lr}, budget {args.minutes} min, "
        f"threads {torch.get_num_threads()}")
    stats = trainer.train()
    config = {
        "name": spec.name,
        "kind": spec.kind,
        "class_name": spec.base.__name__,
        "model_config": spec.model_config,
        "n_params": n_params,
        "input_names": list(spec.input_names),
        "output_name": "out_sample",
        "objective": spec.objective,
        "learned_sigma": False,
        "train_noise_schedule": DDPM_TRAIN if spec.objective == "epsilon" else
        {"type": "rectified_flow", "sigma": "U(0,1)", "x_sigma": "(1-sigma)*x0 + sigma*noise",
         "target": "noise - x0", "model_timestep": "sigma * 1000"},
        "scheduler": spec.scheduler,
        "steps": spec.steps,
        "guidance_scale": spec.guidance_scale,
        "latent_shape": list(spec.latent_shape),
        "conditioning": (
            {"input": "encoder_hidden_states", "tokens": 8, "channels": 32, "table_key": "reference.captions",
             "generator": "numpy default_rng(20240811).standard_normal((10, 8, 32)); null caption = zeros (row 10)"}
            if spec.caption else {"input": "class_labels", "classes": 10, "null_class": NULL_CLASS}),
        "data": {
            "source": "sklearn.datasets.load_digits (1797 8x8 images)", "scale": "pixels / 8 - 1 -> [-1, 1]",
            **({"clips": f"{FRAMES} frames; frame f = digit rolled f px (wrapping), motions "
                         f"{[['right', 'left', 'down', 'up'][m] for m in TRAIN_MOTIONS]}",
                "latent": "[C=1, F, H, W]"} if spec.kind == "latte" else {}),
        },
        "training": {
            "seed": args.seed, "batch": trainer.batch, "lr": trainer.lr, "optimizer": "AdamW(0.9, 0.99, wd 0.01)",
            "schedule": f"warmup {args.warmup} steps, cosine to 0.1x", "grad_clip": 1.0, "ema": args.ema,
            "cond_drop": args.cond_drop, "budget_min": args.minutes, "threads": torch.get_num_threads(),
            "torch": torch.__version__, **stats,
        },
    }
    wpath, cpath = save_reference(spec, trainer.ema, config, args.out, trainer.captions)
    from omnicache_export.zoo.reference import load_reference

    ref = load_reference(spec.name, args.out)  # the fp16-rounded weights, as users load them
    evals = evaluate(ref, args.eval_per_class, seed=args.seed + 1)
    best = max(v["accuracy"] for v in evals.values())
    chosen = min(float(g) for g, v in evals.items() if v["accuracy"] >= best - 0.01)
    config["guidance_scale"] = chosen
    config["eval"] = {"per_class": args.eval_per_class, "seed": args.seed + 1, "steps": spec.steps,
                      "by_guidance": evals, "accuracy": evals[str(chosen)]["accuracy"]}
    save_reference(spec, trainer.ema, config, args.out, trainer.captions)
    size = wpath.stat().st_size
    log(f"== {spec.name}: guidance {chosen} -> accuracy {evals[str(chosen)]['accuracy']:.3f}; "
        f"{wpath} ({size / 1e6:.2f} MB), {cpath}")
    return config


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", choices=[*KINDS, "all"])
    p.add_argument("--minutes", type=float, default=10.0, help="wall-time budget per model (default 10)")
    p.add_argument("--steps", type=int, default=0, help="stop after this many steps (0: budget only)")
    p.add_argument("--out", type=Path, default=WEIGHTS_DIR)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=0, help="default: 128 (dit, pixart), 64 clips (latte)")
    p.add_argument("--lr", type=float, default=0.0, help="default 1e-3")
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--cond-drop", type=float, default=0.1, help="label / caption dropout for guidance")
    p.add_argument("--eval-per-class", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    kinds = list(KINDS) if args.model == "all" else [args.model]
    for kind in kinds:
        run(kind, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
