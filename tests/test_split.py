"""The split on real exports: full keeps the model's numbers, cache reproduces them from the cache
tensor, and no block of the stack survives in the cache graph. Every family, both exporters."""

from __future__ import annotations

import onnx_ir as ir
import pytest

from conftest import family_cases, max_rel_err, run_ort
from omnicache_export.passes import graph_walk as gw
from omnicache_export.passes.scopes import indexed_modules, node_scope
from omnicache_export.graph.split import split
from omnicache_export.zoo.families import FAMILIES

CASES = list(family_cases(FAMILIES))
ALL = {(f, e) for f, fam in FAMILIES.items() for e in fam.exporters}


def attention_on_latent(cache_path, latent: str) -> list[str]:
    """Attention ops of the cache graph that see the latent (conditioning poolers may keep theirs)."""
    model = ir.load(cache_path)
    on_stream = gw.value_descendants([v for v in model.graph.inputs if v.name == latent])
    return [n.name for n in model.graph if n.op_type in gw.ATTENTION_OPS and n in on_stream]


def stack_nodes_left(cache_path, latent: str) -> list[str]:
    """Nodes of the cache graph that sit inside a block and on the latent's stream."""
    model = ir.load(cache_path)
    latents = [v for v in model.graph.inputs if v.name == latent]
    on_stream = gw.value_descendants(latents)
    left = []
    for node in model.graph:
        scope, _ = node_scope(node)
        if node in on_stream and scope and any("block" in prefix for prefix, _ in indexed_modules(scope)):
            left.append(node.name)
    return left


@pytest.mark.parametrize("family,exporter", CASES)
def test_split_reproduces_model(family, exporter, zoo_export, tmp_path):
    fam = FAMILIES[family]
    src = zoo_export(family, exporter)
    result = split(src, tmp_path / "out")
    out = tmp_path / "out"
    assert result.analysis.region.method.startswith("module scopes")
    assert result.analysis.region.n_blocks >= 2

    feeds = fam.example_inputs(2, 1)
    ref = run_ort(src, feeds)[fam.output_name]
    full = run_ort(out / "full.onnx", feeds)
    assert max_rel_err(full[fam.output_name], ref) <= 1e-5
    cache_feeds = {**feeds, **{k: v for k, v in full.items() if k.startswith("omnicache_cache")}}
    cached = run_ort(out / "cache.onnx", cache_feeds)[fam.output_name]
    assert max_rel_err(cached, ref) <= 1e-4

    latent = [s.name for s in result.analysis.io if s.role == "latent"][0]
    assert attention_on_latent(out / "cache.onnx", latent) == []
    assert stack_nodes_left(out / "cache.onnx", latent) == []
    # the cache step is much cheaper: most estimated FLOPs sit in the stack
    assert result.analysis.flop_share is None or result.analysis.flop_share > 0.5


def strip_scopes(src, dst) -> None:
    """What metadata-dropping tools leave: no scope metadata, no meaningful node names."""
    model = ir.load(src)
    for i, node in enumerate(model.graph):
        node.name = f"n{i}"
        node.metadata_props.clear()
    ir.save(model, dst)


STRUCTURE_CASES = [*family_cases(FAMILIES, ("torchscript",)), ("dit", "dynamo"), ("sd3", "dynamo")]


@pytest.mark.parametrize("family,exporter", STRUCTURE_CASES)
def test_split_without_scopes_finds_residual_stream(family, exporter, zoo_export, tmp_path):
    if (family, exporter) not in ALL:
        pytest.skip(f"{family} does not export with {exporter}")
    fam = FAMILIES[family]
    src = tmp_path / "sanitized.onnx"
    strip_scopes(zoo_export(family, exporter), src)
    result = split(src, tmp_path / "out")
    assert result.analysis.region.method.startswith("residual stream")
    feeds = fam.example_inputs(2, 3)
    ref = run_ort(src, feeds)[fam.output_name]
    full = run_ort(tmp_path / "out" / "full.onnx", feeds)
    cache_feeds = {**feeds, **{k: v for k, v in full.items() if k.startswith("omnicache_cache")}}
    cached = run_ort(tmp_path / "out" / "cache.onnx", cache_feeds)[fam.output_name]
    assert max_rel_err(full[fam.output_name], ref) <= 1e-5
    assert max_rel_err(cached, ref) <= 1e-4
    latent = [s.name for s in result.analysis.io if s.role == "latent"][0]
    assert attention_on_latent(tmp_path / "out" / "cache.onnx", latent) == []


def test_wrapped_model_with_indexed_prefix(tmp_path):
    """A user's wrapper that holds the DiT in a ModuleList (`models.0.transformer_blocks.1...`):
    the block list is the inner one, not the wrapper's single entry."""
    import torch

    fam = FAMILIES["dit"]

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.models = torch.nn.ModuleList([fam.build(0)])

        def forward(self, *args):
            return self.models[0](*args)

    feeds = fam.example_inputs(2, 0)
    src = tmp_path / "wrapped.onnx"
    with torch.no_grad():
        torch.onnx.export(
            Wrapper().eval(), tuple(torch.from_numpy(feeds[n]) for n in fam.input_names), str(src),
            dynamo=False, opset_version=17, input_names=fam.input_names, output_names=[fam.output_name],
            dynamic_axes={n: {0: "batch"} for n in [*fam.input_names, fam.output_name]},
        )
    result = split(src, tmp_path / "out")
    assert list(result.analysis.region.block_lists) == ["models.0.transformer_blocks"]
    full = run_ort(tmp_path / "out" / "full.onnx", feeds)
    cached = run_ort(tmp_path / "out" / "cache.onnx", {**feeds, "omnicache_cache": full["omnicache_cache"]})
    assert max_rel_err(cached[fam.output_name], full[fam.output_name]) <= 1e-4
    assert attention_on_latent(tmp_path / "out" / "cache.onnx", "hidden_states") == []
