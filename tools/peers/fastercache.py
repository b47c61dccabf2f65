"""diffusers FasterCache (`FasterCacheConfig`): not run here, for a recorded reason.

Its unconditional-branch reuse hooks the denoiser's forward and slices the keyword inputs named in
`_unconditional_conditional_input_kwargs_identifiers`, assuming the diffusers pipelines' batch order
(uncond first) and keyword calls; the reference models are called positionally with the batch
[cond, uncond] (this project's sampler, shared by every method). With `is_guidance_distilled=True`
(no unconditional reuse) what is left is attention-output reuse with a frequency-weighted
extrapolation, the same skip pattern PAB measures."""

from __future__ import annotations

from ._torch import PeerRun, TorchCase

NAME = "diffusers FasterCache"


class NotApplicable(Exception):
    pass


def run(case: TorchCase) -> PeerRun:
    raise NotApplicable("needs the diffusers pipelines' keyword calls and [uncond, cond] batch order for its "
                        "unconditional-branch reuse; without it (is_guidance_distilled) it is attention reuse like PAB")
