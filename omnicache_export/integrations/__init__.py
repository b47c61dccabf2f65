"""Ways in from diffusers: export a transformer to ONNX with the fixes it needs (`export_transformer`),
write the user's conditioning as a `--calib` npz (`calib_npz`), and run an export in place of
`pipe.transformer` (`dropin.OmniCacheTransformer`). They import torch and diffusers; the runtime does not."""
