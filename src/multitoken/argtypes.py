"""Argument types of the command line: each parses one value or says, in one line, what it must be.

argparse turns the `ArgumentTypeError` into "argument --x: <message>", which the CLI prints as its one-line
error with exit status 2.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def integer(minimum: int = 1) -> Callable[[str], int]:
    """An integer of at least `minimum`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def number(minimum: float = 0.0, *, inclusive: bool = True, maximum: float | None = None) -> Callable[[str], float]:
    """A finite number of at least (or, not `inclusive`, above) `minimum` and at most `maximum`."""
    low = f">= {minimum:g}" if inclusive else f"> {minimum:g}"
    rule = low if maximum is None else f"{low} and <= {maximum:g}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number {rule}, got {text!r}") from None
        below = value < minimum if inclusive else value <= minimum
        if not math.isfinite(value) or below or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"must be a finite number {rule}, got {text}")
        return value

    parse.__name__ = f"number {rule}"
    return parse


def integer_list(minimum: int = 1) -> Callable[[str], list[int]]:
    """A comma-separated list of integers of at least `minimum`, e.g. "1,2,4"."""
    one = integer(minimum)

    def parse(text: str) -> list[int]:
        values = [one(x.strip()) for x in text.split(",") if x.strip()]
        if not values:
            raise argparse.ArgumentTypeError(f"must be a comma-separated list of integers >= {minimum}, got {text!r}")
        return values

    parse.__name__ = f"list of integers >= {minimum}"
    return parse


COUNT = integer(1)  # sizes, steps, counts
NATURAL = integer(0)  # seeds, and counts where 0 means "none"
POSITIVE = number(0.0, inclusive=False)  # learning rates, seconds
NONNEGATIVE = number(0.0)  # temperatures, scales, weights
PROBABILITY = number(0.0, inclusive=False, maximum=1.0)  # top-p
FRACTION = number(0.0, maximum=1.0)  # mixture weights
