"""Garbage-collector settings for the long-running daemon.

Rule evaluation allocates many short-lived tuples; with Python's default thresholds
the cyclic collector runs every few hundred allocations and walks the store's
long-lived objects each time. Once start-up is done, freezing what exists and
collecting young objects less often cuts that cost (measured in bench/rules_eval.py)
without holding garbage: reference counting still frees almost everything at once.
"""

from __future__ import annotations

import gc

__all__ = ["GEN0_THRESHOLD", "tune_for_daemon"]

GEN0_THRESHOLD = 20_000


def tune_for_daemon() -> None:
    """Move start-up objects out of the collector's way and collect young ones less often."""
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GEN0_THRESHOLD, gen1, gen2)
