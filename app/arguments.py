"""Argument types the commands share (argparse ``type=`` callables: a bad value is a usage error naming it)."""

from __future__ import annotations

import argparse


def whole_number(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < least:
        raise argparse.ArgumentTypeError(f"expected a whole number >= {least}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    return whole_number(text, 1)
