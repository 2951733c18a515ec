"""The package version (read by pyproject.toml and written into checkpoint metadata)."""

__version__ = "0.1.0"
