"""The version of the protowatch distribution: the one place it is written (pyproject.toml reads it)."""
__version__ = "0.3.0"
