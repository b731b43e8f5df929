"""`gc_paused()`: the cyclic garbage collector off while a large plan is built or written."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def gc_paused() -> Iterator[None]:
    """The cyclic garbage collector off while planning, back as it was afterwards.

    Planning a large fleet allocates millions of short-lived objects beside the facts'
    hundreds of thousands of long-lived ones; each collection of the oldest generation
    walks them all (about a third of a 10,000-node plan's CPU time, docs/benchmarks/plan.md).
    Nothing the pipeline builds relies on the collector: its objects are freed by
    reference counting, and the few cycles (none expected) wait for the next collection.
    """
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()
