"""Argument types shared by the benchmark scripts."""
from __future__ import annotations

import argparse


def positive(text: str) -> int:
    """An integer >= 1 for argparse (``--num-proto``, ``--dim``); anything else is a one-line error."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value
