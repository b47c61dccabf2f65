"""Module scopes of nodes, as the two torch exporters record them.

- TorchScript (`dynamo=False`) names nodes after the module path: `/transformer_blocks.0/attn1/to_q/MatMul`
  (the last part is the op). Wrappers add a prefix (`/m/transformer_blocks.0/...`).
- dynamo (`dynamo=True`) names nodes flatly and stores the path in the metadata property
  `pkg.torch.onnx.name_scopes`: a Python-literal list like `['', 'm', 'm.transformer_blocks.0', ..., 'view_2']`
  whose last entry is the FX node, not a module.

Both become one dotted module path, `m.transformer_blocks.0.attn1.to_q`, or None where a node has no scope.
"""

from __future__ import annotations

import ast

import onnx_ir as ir

DYNAMO_SCOPE_KEY = "pkg.torch.onnx.name_scopes"


def dynamo_scope(node: ir.Node) -> str | None:
    raw = node.metadata_props.get(DYNAMO_SCOPE_KEY)
    if not raw:
        return None
    try:
        scopes = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return None
    modules = [s for s in scopes[:-1] if s] if isinstance(scopes, list) else []
    return modules[-1] if modules else None


def torchscript_scope(node: ir.Node) -> str | None:
    name = node.name or ""
    if not name.startswith("/"):
        return None
    parts = [p for p in name.split("/")[:-1] if p]
    return ".".join(parts) if parts else None


def node_scope(node: ir.Node) -> tuple[str | None, str | None]:
    """(dotted module path, which exporter's convention it came from)."""
    scope = dynamo_scope(node)
    if scope:
        return scope, "dynamo metadata"
    scope = torchscript_scope(node)
    if scope:
        return scope, "torchscript names"
    return None, None


def indexed_modules(scope: str) -> list[tuple[str, int]]:
    """Every indexed module on a path, outermost first: `m.0.blocks.3.ff.net.0` ->
    [('m', 0), ('m.0.blocks', 3), ('m.0.blocks.3.ff.net', 0)]."""
    parts = scope.split(".")
    return [(".".join(parts[:i]), int(part)) for i, part in enumerate(parts) if part.isdigit() and i > 0]

