"""argparse types shared by the subcommands: a count below 1 is refused at parse time, never taken as "nothing"
(``validate --max-records -1`` checked no record and passed) or left to fail deep inside (``report --samples -1``
was a ValueError traceback)."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """An ``int`` of 1 or more."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: must be 1 or more")
    return value
