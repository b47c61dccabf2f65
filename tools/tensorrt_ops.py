"""Regenerate `omnicache_export/graph/tensorrt_ops.py` (TensorRT's ONNX operator matrix per TensorRT
line) from onnx-tensorrt's `docs/operators.md` files.

The data is committed and never fetched at test time; this script makes it reproducible. Pass each
table with the TensorRT line it stands for, where it comes from (repository, commit, path) and the
release-note changes applied on top of it:

    git -C onnx-tensorrt show 96e781103cfc4adf4a6bb557e94bac8e693f6f4c:docs/operators.md > ops-10.1.md
    # docs/operators.md at commit 6d0ab7be324d02c7feb3a306b6fdbeae84f71ddc: the 10.15 GA table
    python tools/tensorrt_ops.py --table 10.3=ops-10.1.md --table 10.16=ops-10.15.md \
        --table 11=ops-10.15.md -o omnicache_export/graph/tensorrt_ops.py

The sources and release-note deltas of the three lines are recorded in LINES below (edit them
there when a new table is published); --table only says which file holds each line's table.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

REPO = "https://github.com/onnx/onnx-tensorrt"

# Per TensorRT line: the table it is built from, and the release notes applied on top of it.
LINES: dict[str, dict] = {
    "10.3": {
        "name": "TensorRT 10.3 (JetPack 6, Orin)",
        "table_version": "10.1 GA + 10.3 changelog",
        "source": f"{REPO}/blob/96e781103cfc4adf4a6bb557e94bac8e693f6f4c/docs/operators.md",
        "notes": [
            "the 10.2/10.3 GA operators.md was not retrievable here: the 10.1 GA table (commit 96e7811) "
            "with docs/Changelog.md's 10.2 and 10.3 entries applied",
            "10.3 changelog: tensor `axes` inputs for Slice supported (the Slice restriction dropped)",
        ],
        "strongly_typed_only": False,
        "overrides": {"Slice": {"restrictions": ""}},
    },
    "10.16": {
        "name": "TensorRT 10.16 (JetPack 7, Thor; servers)",
        "table_version": "10.15 GA",
        "source": f"{REPO}/blob/6d0ab7be324d02c7feb3a306b6fdbeae84f71ddc/docs/operators.md",
        "notes": ["10.15 is the newest published table; 10.16 is checked against it"],
        "strongly_typed_only": False,
        "overrides": {},
    },
    "11": {
        "name": "TensorRT 11.x",
        "table_version": "10.15 GA + 11.x release notes",
        "source": f"{REPO}/blob/6d0ab7be324d02c7feb3a306b6fdbeae84f71ddc/docs/operators.md",
        "notes": [
            "NVIDIA TensorRT 11.x release notes: ONNX opset up to 25",
            "11.x release notes: weak typing removed; every network is strongly typed (precision from the graph)",
            "11.2 release notes: DFT only through a plugin (the parser has no native DFT)",
        ],
        "max_opset": 25,
        "strongly_typed_only": True,
        "overrides": {"DFT": {"supported": "plugin", "restrictions": "only through a TensorRT plugin, from 11.2"}},
    },
}

TYPOS = {"INF64": "INT64"}  # the 10.0-10.1 tables' ConstantOfShape row spells INT64 so
_OPSET = re.compile(r"opset\s+(\d+)\s+to\s+opset\s+(\d+)", re.I)
_ROW = re.compile(r"^\|\s*([A-Za-z][A-Za-z0-9]*)\s*\|\s*([^|]*)\|?(.*)$")


def parse_table(text: str) -> tuple[dict[str, dict], tuple[int, int] | None]:
    """operators.md -> ({op: {supported, types, restrictions}}, (min opset, max opset) from its header)."""
    ops: dict[str, dict] = {}
    for line in text.splitlines():
        m = _ROW.match(line.strip())
        if not m or m.group(1) == "Operator":
            continue
        op, flag, rest = m.group(1), m.group(2).strip(), m.group(3)
        cells = [c.strip() for c in rest.split("|")]
        types = [TYPOS.get(t.strip(), t.strip()) for t in (cells[0] if cells else "").split(",") if t.strip()]
        restrictions = " ".join(c for c in cells[1:] if c).replace("<br />", " ").strip()
        supported = flag.upper().startswith("Y")
        ops[op] = {"supported": supported, "types": types if supported else [],
                   "restrictions": restrictions if supported else " ".join(c for c in cells if c)}
    header = _OPSET.search(text)
    return ops, (int(header.group(1)), int(header.group(2))) if header else None


def build(tables: dict[str, Path]) -> dict[str, dict]:
    data = {}
    for line, path in tables.items():
        if line not in LINES:
            raise SystemExit(f"--table {line}=...: unknown TensorRT line (known: {', '.join(LINES)})")
        ops, opsets = parse_table(path.read_text())
        if not ops:
            raise SystemExit(f"{path}: no operator rows found (not onnx-tensorrt's docs/operators.md?)")
        meta = dict(LINES[line])
        for op, change in meta.pop("overrides").items():
            ops[op] = {**ops.get(op, {"supported": False, "types": [], "restrictions": ""}), **change}
        meta["min_opset"] = opsets[0] if opsets else 9
        meta.setdefault("max_opset", opsets[1] if opsets else None)  # the table's header, unless the notes say more
        data[line] = {**meta, "ops": dict(sorted(ops.items()))}
    return data


HEADER = '''"""TensorRT's ONNX parser operator matrix, per supported TensorRT line: generated data, do not edit.

Regenerate with `python tools/tensorrt_ops.py` (its docstring has the command and the sources).
Each line records its table's version and source (onnx-tensorrt's docs/operators.md at a commit),
the release-note changes applied on top, and the opset range; each op: supported (True, False or
"plugin"), the supported types as the table names them, and the table's restrictions.
"""

# fmt: off
'''


def render(data: dict[str, dict]) -> str:
    """The module text: each line's fields, then one op a row (diffable)."""
    out = ["LINES = {"]
    for line, meta in data.items():
        out.append(f"    {line!r}: {{")
        for key, value in meta.items():
            if key != "ops":
                out.append(f"        {key!r}: {value!r},")
        out.append("        'ops': {")
        out.extend(f"            {op!r}: {row!r}," for op, row in meta["ops"].items())
        out.append("        },")
        out.append("    },")
    return "\n".join([*out, "}", ""])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--table", action="append", required=True, metavar="LINE=operators.md",
                   help="the operators.md file a TensorRT line's data is built from (repeatable)")
    p.add_argument("-o", "--output", type=Path, default=None, help="the module to write (default: stdout)")
    a = p.parse_args(argv)
    tables = {}
    for item in a.table:
        line, sep, path = item.partition("=")
        if not sep:
            raise SystemExit(f"--table {item!r}: expected LINE=PATH")
        tables[line] = Path(path)
    text = HEADER + render(build(tables))
    if a.output is None:
        sys.stdout.write(text)
    else:
        a.output.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
