"""TeaCache-style caching (Liu et al. 2024), written here for diffusers' BasicTransformerBlock models
(no library of it runs these models): at each step the first block's modulated input (what enters
its self-attention: norm1 output, timestep-modulated) is computed alone; while the accumulated
relative L1 change of it since the last full step stays below `threshold`, every block is skipped
and the stack output is the current stack input plus the stack residual of the last full step
(the head, `norm_out` onwards, runs on it). The first and the last step are always full (as in
TeaCache). No polynomial rescaling (TeaCache fits one per model; none exists for these models).
The threshold is tuned so the full-step count meets the target."""

from __future__ import annotations

import torch

from ._torch import PeerRun, TorchCase, block_lists, first_block, fresh, last_block, run_torch, tune

NAME = "TeaCache-style"


class _Probe(Exception):
    def __init__(self, value: torch.Tensor):
        self.value = value


class TeaCache:
    def __init__(self, model: torch.nn.Module, threshold: float, n_steps: int):
        self.model, self.threshold, self.n_steps = model, threshold, n_steps
        self.step = 0
        self.reset()
        head = first_block(model)
        self._probing = False

        def attn_pre(_mod, args, kwargs):
            if self._probing:
                raise _Probe(args[0] if args else kwargs["hidden_states"])

        head.attn1.register_forward_pre_hook(attn_pre, with_kwargs=True)
        for _, blocks in block_lists(model):
            for block in blocks:
                block.forward = self._wrap(block, block.forward, block is head)
        model.norm_out.register_forward_pre_hook(self._head_input)

    def reset(self) -> None:
        self.prev_mod = None
        self.acc = 0.0
        self.residual = None
        self.h0 = None
        self.skip = False

    def _decide(self, mod: torch.Tensor) -> bool:
        if self.step == 0 or self.step == self.n_steps - 1 or self.prev_mod is None or self.residual is None:
            self.acc = 0.0
            skip = False
        else:
            rel = ((mod - self.prev_mod).abs().mean() / self.prev_mod.abs().mean().clamp_min(1e-12)).item()
            self.acc += rel
            skip = self.acc < self.threshold
            if not skip:
                self.acc = 0.0
        self.prev_mod = mod
        return skip

    def _wrap(self, block, forward, is_head: bool):
        def wrapped(hidden_states, *args, **kwargs):
            if is_head:
                self._probing = True
                try:
                    forward(hidden_states, *args, **kwargs)
                    raise RuntimeError("the first block never called its self-attention")
                except _Probe as p:
                    mod = p.value
                finally:
                    self._probing = False
                self.skip = self._decide(mod)
                self.h0 = hidden_states
            if self.skip:
                return hidden_states
            return forward(hidden_states, *args, **kwargs)

        return wrapped

    def _head_input(self, _mod, args):
        h = args[0]
        if self.skip:
            return (self.h0 + self.residual,)
        if h.shape != self.h0.shape:
            raise RuntimeError(f"stack input {tuple(self.h0.shape)} and output {tuple(h.shape)} differ")
        self.residual = h - self.h0
        return None


def run(case: TorchCase) -> PeerRun:
    def attempt(threshold: float) -> PeerRun:
        model = fresh(case.model)
        tc = TeaCache(model, threshold, case.spec.n_steps)

        def before(i: int) -> None:
            tc.step = i
            if i == 0:
                tc.reset()

        final, n_full, wall = run_torch(case, model, last_block(model).ff, before=before)
        return PeerRun(final, n_full, wall, f"threshold={threshold:.4g}")

    return tune(attempt, case.target_full, 1e-4, 100.0)
