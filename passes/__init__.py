"""Graph passes: each one ONNX model -> ONNX model (or an analysis result), built on onnx_ir.

None runs a model (shape probing by ONNX Runtime is analysis: omnicache_export.graph.shape_probe).

Analyses: `locate_blocks` (the block stack), `static_shapes` (concrete shapes by shape inference).

Repairs of exporter traps ONNX Runtime refuses to load, on the user's model as it is loaded
(`omnicache_export.graph.repair`), one pass per trap: FoldSqueezeIfPass (TorchScript's
`If(dim == 1, Squeeze, Identity)` on a static dim != 1), DropNoopSqueezePass (dynamo's `Squeeze`
of such a dim).

The split, from one source model:
- full graph: AddCacheOutputPass (one `omnicache_cache[_k]` output per cache stream);
- cache graph: CutBlockStackPass (the stack cut out, the caches as inputs), which runs
  FoldShapeIfPass, MaterializeShapeReadsPass and PruneDeadPass on the cut graph.

The correction, on the cut cache graph, in this order (`correction_pipeline` builds it):
1. ExtrapolateCachePass (where the cache trend is used): R̂ = R + ρ[step] (R − R_prev);
2. EmbedCorrectionPass: out = õ + λ[step] (prev − õ) + coef[step] F_step(prev − prev2);
3. FreezeTablesPass (export only): the per-step table inputs become constants.
Calibration runs the graph after 2, feeding each candidate's tables; the export writes it after 3.
Each pass's `requires` rejects a graph it does not belong to in this order.

Support: `cache_names` (the tensor names the graphs, calibration and the runtime share), `hartley` (the
filter's real matrices), `add_cache_output.value_index`, `graph_walk`, `scopes`.
"""
