"""Peer cache methods for tools/bench_quality.py, one file each (see each module's docstring)."""
