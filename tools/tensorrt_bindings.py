"""TensorRT's Python API names per version, read from the compiled bindings, and the TensorRT names
a source file uses: a static check for a machine without TensorRT.

    python tools/tensorrt_bindings.py [--versions 10.3.0,10.16.1.11,11.4.0.106] FILE.py ...

The `tensorrt-cu12-bindings` wheels on PyPI hold the compiled module (`tensorrt_bindings/tensorrt.so`)
but not the libraries it links, so it cannot be imported here; its bytes are read instead. pybind11
keeps every name it registers (classes, methods, properties, enum members) as a NUL-terminated
string, so the set of identifier strings is a superset of the API. The linker merges a string into
a longer one that ends with it ("INT8" into "UINT8"), so a name counts as present where some string
ends with it: a removed or misspelled name is caught, a name that only happens to end another
string is not (e.g. BuilderFlag.FP16 is found in 10.x and absent from 11.x, as NVIDIA documents).

The uses are collected with `ast`: every attribute chain on the name `trt` (`trt.BuilderFlag.REFIT`)
and every attribute of a variable or `self.` attribute annotated with a `trt.` type
(`context: trt.IExecutionContext` ... `context.execute_async_v3`). A use inside
`if hasattr(obj, "name"):` is needed only in versions that have `name`; one in its `else:` only in
versions that lack it.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import warnings
import zipfile
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path

VERSIONS = ("10.3.0", "10.16.1.11", "11.4.0.106")  # JetPack 6, JetPack 7 (Thor), the newest on PyPI
PACKAGE = "tensorrt-cu12-bindings"
CACHE = Path.home() / ".cache" / "omnicache-export" / "tensorrt-bindings"
_IDENT = re.compile(rb"[A-Za-z_][A-Za-z0-9_]*")


# ------------------------------------------------------------------ names in the compiled bindings


def wheel_path(version: str, cache: Path = CACHE) -> Path:
    """The bindings wheel of `version` for this interpreter, downloaded once into `cache` (pip
    download --no-deps); raises RuntimeError with pip's last line where the download fails."""
    folder = Path(cache) / version
    found = sorted(folder.glob("*.whl"))
    if found:
        return found[0]
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / f".download-{os.getpid()}"  # renamed into place whole: concurrent runs never see half a wheel
    done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(partial),
                           f"{PACKAGE}=={version}"], capture_output=True, text=True)
    got = sorted(partial.glob("*.whl"))
    if done.returncode != 0 or not got:
        shutil.rmtree(partial, ignore_errors=True)
        lines = [line for line in (done.stderr or done.stdout).splitlines() if line.strip()]
        raise RuntimeError(f"pip download {PACKAGE}=={version} failed: {lines[-1] if lines else done.returncode}")
    os.replace(got[0], folder / got[0].name)
    partial.rmdir()
    return folder / got[0].name


@dataclasses.dataclass(frozen=True)
class BindingNames:
    """The identifier strings of one version's compiled module (and its Python files)."""

    version: str
    strings: frozenset[str]  # whole NUL-terminated identifier strings
    _joined: bytes  # every string, NUL-terminated, for the suffix lookup

    def __contains__(self, name: str) -> bool:
        return name in self.strings or (name.encode() + b"\0") in self._joined

    def exact(self, name: str) -> bool:
        return name in self.strings


def binding_names(wheel: Path, version: str = "") -> BindingNames:
    """Read the identifier strings of the wheel's compiled module(s) and the names its Python
    files define, without importing anything."""
    strings: set[str] = set()
    with zipfile.ZipFile(wheel) as z:
        members = [m for m in z.namelist() if m.startswith("tensorrt_bindings/")]
        libraries = [m for m in members if m.endswith(".so")]
        if not libraries:
            raise ValueError(f"{wheel}: no compiled module under tensorrt_bindings/")
        for member in libraries:
            data = z.read(member)
            for chunk in data.split(b"\0"):
                if chunk and _IDENT.fullmatch(chunk):
                    strings.add(chunk.decode())
        for member in members:
            if member.endswith(".py"):
                with warnings.catch_warnings():  # their own invalid escape sequences
                    warnings.simplefilter("ignore", SyntaxWarning)
                    warnings.simplefilter("ignore", DeprecationWarning)
                    tree = ast.parse(z.read(member))
                strings.update(n.id for n in ast.walk(tree) if isinstance(n, ast.Name))
                strings.update(n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef)))
    return BindingNames(version, frozenset(strings), b"\0".join(s.encode() for s in sorted(strings)) + b"\0")


@lru_cache(maxsize=None)
def names_of_version(version: str, cache: Path = CACHE) -> BindingNames:
    return binding_names(wheel_path(version, cache), version)


# ------------------------------------------------------------------ names a source file uses


@dataclasses.dataclass(frozen=True)
class Use:
    """One TensorRT name looked up in the source: `owner.name` (owner: "trt", or a trt type)."""

    path: str
    line: int
    owner: str
    name: str
    needs: tuple[str, ...] = ()  # hasattr names this use sits under (runs only where they exist)
    lacks: tuple[str, ...] = ()  # hasattr names whose else branch holds it (runs only where they don't)

    def runs_in(self, names: BindingNames) -> bool:
        return all(n in names for n in self.needs) and not any(n in names for n in self.lacks)

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.owner}.{self.name}"


def _trt_type(annotation: ast.expr | None) -> str | None:
    """"IExecutionContext" from `trt.IExecutionContext`, `trt.X | None` or "trt.X" (a string)."""
    if annotation is None:
        return None
    if isinstance(annotation, ast.Constant) and isinstance(annotation.value, str):
        try:
            annotation = ast.parse(annotation.value, mode="eval").body
        except SyntaxError:
            return None
    if isinstance(annotation, ast.BinOp) and isinstance(annotation.op, ast.BitOr):
        return _trt_type(annotation.left) or _trt_type(annotation.right)
    if isinstance(annotation, ast.Attribute) and isinstance(annotation.value, ast.Name) and annotation.value.id == "trt":
        return annotation.attr
    return None


def _hasattr_name(test: ast.expr) -> str | None:
    if (isinstance(test, ast.Call) and isinstance(test.func, ast.Name) and test.func.id == "hasattr"
            and len(test.args) == 2 and isinstance(test.args[1], ast.Constant) and isinstance(test.args[1].value, str)):
        return test.args[1].value
    return None


class _Collector(ast.NodeVisitor):
    def __init__(self, path: str):
        self.path = path
        self.uses: list[Use] = []
        self.needs: list[str] = []
        self.lacks: list[str] = []
        self.scopes: list[dict[str, str]] = [{}]  # variable -> trt type, per function
        self.self_types: list[dict[str, str]] = [{}]  # self.attribute -> trt type, per class

    def _use(self, node: ast.AST, owner: str, name: str) -> None:
        self.uses.append(Use(self.path, getattr(node, "lineno", 0), owner, name, tuple(self.needs), tuple(self.lacks)))

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        types: dict[str, str] = {}
        for sub in ast.walk(node):  # `self.x: trt.T = ...` anywhere in the class
            if (isinstance(sub, ast.AnnAssign) and isinstance(sub.target, ast.Attribute)
                    and isinstance(sub.target.value, ast.Name) and sub.target.value.id == "self"
                    and (t := _trt_type(sub.annotation))):
                types[sub.target.attr] = t
            elif isinstance(sub, ast.AnnAssign) and isinstance(sub.target, ast.Name) and (t := _trt_type(sub.annotation)):
                if sub in node.body:  # a class-level annotation
                    types[sub.target.id] = t
        self.self_types.append(types)
        self.generic_visit(node)
        self.self_types.pop()

    def _function(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        scope = {a.arg: t for a in (*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs)
                 if (t := _trt_type(a.annotation))}
        for sub in ast.walk(node):
            if isinstance(sub, ast.AnnAssign) and isinstance(sub.target, ast.Name) and (t := _trt_type(sub.annotation)):
                scope[sub.target.id] = t
        self.scopes.append(scope)
        self.generic_visit(node)
        self.scopes.pop()

    visit_FunctionDef = _function
    visit_AsyncFunctionDef = _function

    def generic_visit(self, node: ast.AST) -> None:
        for _, value in ast.iter_fields(node):
            if isinstance(value, list) and value and isinstance(value[0], ast.stmt):
                self._block(value)
            elif isinstance(value, list):
                for item in value:
                    if isinstance(item, ast.AST):
                        self.visit(item)
            elif isinstance(value, ast.AST):
                self.visit(value)

    def _block(self, stmts: Sequence[ast.stmt]) -> None:
        """A statement list; after `if hasattr(o, "n"): ... return` (no else) the rest of the
        block is the else branch."""
        for i, stmt in enumerate(stmts):
            self.visit(stmt)
            if (isinstance(stmt, ast.If) and not stmt.orelse and (name := _hasattr_name(stmt.test))
                    and isinstance(stmt.body[-1], (ast.Return, ast.Raise, ast.Continue, ast.Break))):
                self.lacks.append(name)
                self._block(stmts[i + 1:])
                self.lacks.pop()
                return

    def visit_If(self, node: ast.If) -> None:
        name = _hasattr_name(node.test)
        self.visit(node.test)
        if name is None:
            self._block(node.body)
            self._block(node.orelse)
            return
        self.needs.append(name)
        self._block(node.body)
        self.needs.pop()
        self.lacks.append(name)
        self._block(node.orelse)
        self.lacks.pop()

    def visit_Attribute(self, node: ast.Attribute) -> None:
        chain: list[ast.Attribute] = []
        base: ast.expr = node
        while isinstance(base, ast.Attribute):
            chain.append(base)
            base = base.value
        chain.reverse()  # outermost lookup first: trt.A.B -> [trt.A, trt.A.B]
        owner = None
        if isinstance(base, ast.Name) and base.id == "trt":
            owner, rest = "trt", chain
        elif isinstance(base, ast.Name) and base.id in self.scopes[-1]:
            owner, rest = self.scopes[-1][base.id], chain[:1]
        elif (isinstance(base, ast.Name) and base.id == "self" and chain
              and chain[0].attr in self.self_types[-1]):
            owner, rest = self.self_types[-1][chain[0].attr], chain[1:2]
        if owner is None:
            self.generic_visit(node)
            return
        for link in rest:
            self._use(link, owner, link.attr)
            owner = link.attr
        self.visit(base)  # subscripts and calls inside the chain's base are visited on their own
        for link in chain:
            for child in ast.iter_child_nodes(link):
                if child is not link.value:
                    self.visit(child)


def tensorrt_uses(paths: Iterable[Path]) -> list[Use]:
    """Every TensorRT name the files look up (see the module's doc for what is recognized)."""
    uses: list[Use] = []
    for path in paths:
        collector = _Collector(str(path))
        collector.visit(ast.parse(Path(path).read_text(encoding="utf-8"), filename=str(path)))
        uses.extend(collector.uses)
    return uses


def missing(uses: Sequence[Use], names: BindingNames) -> list[Use]:
    """The uses that run in this version but name something its bindings lack."""
    return [u for u in uses if u.runs_in(names) and u.name not in names]


# ------------------------------------------------------------------ tensorrt-stubs for mypy

STUBS = "tensorrt-stubs==10.13.0.35.1"  # third-party; requires tensorrt==10.13, hence --no-deps


def stubs_dir(cache: Path = CACHE.parent / "tensorrt-stubs") -> Path:
    """`tensorrt-stubs`, installed with --no-deps into a private folder for mypy's `mypy_path` (it
    shadows the `tensorrt` name, so never where Polygraphy runs) and repaired where its generated
    stubs are not valid Python (`_repair_stub`); RuntimeError with pip's last line where the
    download fails."""
    target = Path(cache) / STUBS.replace("==", "-")
    done_marker = target / ".repaired"
    if done_marker.is_file():
        return target
    raw = target.with_name(target.name + ".download")
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-compile",
                           "--target", str(raw), "--upgrade", STUBS], capture_output=True, text=True)
    if done.returncode != 0:
        lines = [line for line in (done.stderr or done.stdout).splitlines() if line.strip()]
        raise RuntimeError(f"pip install {STUBS} failed: {lines[-1] if lines else done.returncode}")
    for stub in raw.rglob("*.pyi"):
        stub.write_text(_repair_stub(stub.read_text(encoding="utf-8")), encoding="utf-8")
    if target.exists():
        shutil.rmtree(target)
    raw.rename(target)
    done_marker.write_text(STUBS + "\n", encoding="utf-8")
    return target


def _repair_stub(text: str) -> str:
    """tensorrt-stubs 10.13.0.35.1 is generated and 5 of its lines do not parse: 4 plugin methods
    name a parameter `in` (a keyword: renamed `in_`) and `add_scale_nd` puts a parameter without a
    default after ones with defaults (given `= ...`). Fixed line by line until the file parses."""
    text = re.sub(r"(?m)^(\s*def .*[(, ])in: ", r"\1in_: ", text)
    lines = text.split("\n")
    for _ in range(100):
        try:
            ast.parse("\n".join(lines))
            break
        except SyntaxError as exc:
            i = (exc.lineno or 1) - 1
            if "non-default argument" not in exc.msg or i >= len(lines):
                raise
            head, _, tail = lines[i].partition("(")
            params, sep, rest = tail.rpartition(")")
            parts, seen = [], False
            for part in _top_level_split(params):
                seen |= "=" in part
                parts.append(part if "=" in part or not seen or part.startswith("*") else part + " = ...")
            lines[i] = head + "(" + ", ".join(parts) + sep + rest
    return "\n".join(lines)


def _top_level_split(params: str) -> list[str]:
    """`a: dict[str, int], b: int` -> the two parameters (commas inside brackets kept)."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(params):
        depth += ch in "[(" and 1 or (ch in "])" and -1 or 0)
        if ch == "," and depth == 0:
            parts.append(params[start:i].strip())
            start = i + 1
    parts.append(params[start:].strip())
    return parts


CHECKED_MODULES = ("omnicache_export.engines.tensorrt", "omnicache_export.engines.tensorrt_build",
                   "omnicache_export.engines.tensorrt_compat")


def run_mypy(root: Path, stubs: Path, scratch: Path, modules: Sequence[str] = CHECKED_MODULES) -> tuple[int, str]:
    """mypy (with the project's [tool.mypy]) over `modules` against the stubs: (exit status, report).
    The package maps folders (`engines/` is `omnicache_export.engines`), which mypy cannot follow in
    an editable install, so `scratch` gets the installed layout as symbolic links."""
    try:
        import tomllib
    except ImportError:  # Python 3.10: mypy's own dependency
        import tomli as tomllib

    root = Path(root).resolve()
    tree = Path(scratch) / "tree"
    config = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))
    package_dirs = config["tool"]["setuptools"].get("package-dir", {})
    top = tree / "omnicache_export"
    top.mkdir(parents=True, exist_ok=True)
    for entry in (root / package_dirs.get("omnicache_export", "omnicache_export")).iterdir():
        if not (top / entry.name).exists():
            (top / entry.name).symlink_to(entry)
    for package, folder in package_dirs.items():
        link = tree / package.replace(".", "/")
        if package != "omnicache_export" and not link.exists():
            link.symlink_to(root / folder)
    env = {**os.environ, "MYPYPATH": f"{tree}{os.pathsep}{stubs}"}
    args = [sys.executable, "-m", "mypy", "--config-file", str(root / "pyproject.toml"),
            "--cache-dir", str(Path(scratch) / "mypy-cache"), "--no-error-summary", "--show-error-codes"]
    done = subprocess.run([*args, *(f"-m{m}" for m in modules)], capture_output=True, text=True, cwd=tree, env=env)
    return done.returncode, (done.stdout + done.stderr).strip()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--versions", default=",".join(VERSIONS))
    a = p.parse_args(argv)
    uses = tensorrt_uses(a.files)
    bad = 0
    for version in a.versions.split(","):
        names = names_of_version(version)
        gaps = missing(uses, names)
        bad += len(gaps)
        print(f"TensorRT {version}: {len(uses)} uses, {sum(u.runs_in(names) for u in uses)} in this version's "
              f"branches, {len(gaps)} missing" + "".join(f"\n  {u}" for u in gaps))
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
