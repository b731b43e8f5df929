"""Which runtime (name and version) serves a backend: `choose_runtime`."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from stack.spec import StackSpec


def version_key(version: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key for versions such as `0.11.0`, `b6700`, `0.3.36` (numbers compare as numbers)."""
    parts = re.findall(r"\d+|[A-Za-z]+", version)
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in parts)


def choose_runtime(spec: StackSpec, backend: str,
                   version: str | None) -> tuple[str, str | None] | str:
    """(runtime name, version) serving `backend`, or the reason there is none.

    The runtime's name is the backend unless `RuntimeSpec.backend` says otherwise; the
    version is the one asked for, else the newest listed in `[runtimes]`. Without a
    `[runtimes]` table for the backend, the runtime catalogue serves it: any version asked
    for, else its default (which `place` may change per vendor: `catalog.default_version`).
    """
    from stack.catalog import catalogue

    serving = [(name, rt) for name, rt in sorted(spec.runtimes.items())
               if (rt.backend or name) == backend]
    if version is not None:
        for name, rt in serving:
            if version in rt.versions:
                return name, version
        if backend == "custom":
            return "custom", version
        if not serving and backend in catalogue():
            return backend, version
        return f"no `[runtimes]` entry for backend `{backend}` lists version `{version}`"
    best: tuple[tuple[tuple[int, int | str], ...], str, str] | None = None
    for name, rt in serving:
        for v in rt.versions:
            key = (version_key(v), name, v)
            if best is None or key[:1] > best[:1]:
                best = key
    if best is None:
        if backend == "custom":
            return "custom", None
        if backend in catalogue():
            return backend, catalogue()[backend].default
        return f"no `[runtimes]` entry serves backend `{backend}`"
    return best[1], best[2]


def runtime_refusal(spec: StackSpec, runtime: tuple[str, str | None] | str,
                    vendor: str) -> str | None:
    """Why the runtime cannot be installed for `vendor` devices (`cpu`: none): a catalogue
    runtime without a variant for that vendor (`stack.catalog.recipe`'s reason); None
    when it can."""
    from stack.catalog import from_catalogue, recipe

    if isinstance(runtime, str) or runtime[1] is None or not from_catalogue(spec, runtime[0]):
        return None
    found = recipe(spec, runtime[0], runtime[1], vendor)
    return found if isinstance(found, str) else None
