"""memgan-bench: the benchmark side (data, splits, metrics, records, runner, reports, CLI)."""

__version__ = "0.1.0"  # kept equal to pyproject.toml's version; the CLI prefers the installed metadata
