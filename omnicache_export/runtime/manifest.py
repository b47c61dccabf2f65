"""`omnicache.json`: the only contract between export and runtime. Versioned; artifacts hashed."""

from __future__ import annotations

import json
from pathlib import Path

from omnicache_export import __version__
from omnicache_export.errors import UserError
from omnicache_export.graph.modelio import sha256_file

FORMAT = "omnicache-export/manifest"
VERSION = 1
FILENAME = "omnicache.json"


def artifact_entries(folder: Path, names: list[str]) -> dict:
    """sha256 and size of each artifact (and its external-data side file, if any)."""
    entries = {}
    for name in names:
        for path in (folder / name, folder / f"{name}.data"):
            if path.is_file():
                entries[path.name] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return entries


def write_manifest(folder: Path, body: dict) -> Path:
    manifest = {"format": FORMAT, "version": VERSION, "created_by": f"omnicache-export {__version__}", **body}
    path = folder / FILENAME
    path.write_text(json.dumps(manifest, indent=1) + "\n")
    return path


def read_manifest(folder: str | Path, check_files: bool = True) -> dict:
    """Load and validate; refuse an unknown version or artifacts that changed since export."""
    folder = Path(folder)
    path = folder / FILENAME
    if not path.is_file():
        raise UserError(f"{folder}: no {FILENAME} (not an omnicache-export output folder)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None
    if manifest.get("format") != FORMAT:
        raise UserError(f"{path}: not an omnicache-export manifest")
    if manifest.get("version") != VERSION:
        raise UserError(f"{path}: manifest version {manifest.get('version')!r} is not supported (this runtime reads {VERSION})")
    if check_files:
        for name, entry in manifest.get("artifacts", {}).items():
            target = folder / name
            if not target.is_file():
                raise UserError(f"{path}: artifact {name} is missing")
            if sha256_file(target) != entry["sha256"]:
                raise UserError(f"{path}: artifact {name} changed since export (sha256 mismatch)")
    return manifest
