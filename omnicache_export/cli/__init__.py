"""The command line: `omnicache-export VERB ...`."""

from omnicache_export.cli.main import main

__all__ = ["main"]
