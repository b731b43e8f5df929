"""Splitting a llama.cpp replica by whole layers over devices of unequal free memory."""

from __future__ import annotations

from stack.estimate.types import Claim


def split_layers(layers: int, layer_bytes: int, fixed: int,
                 free: list[int]) -> tuple[int, ...] | None:
    """Whole layers per device, in proportion to each device's free memory, none beyond
    what it can hold; None when the devices cannot hold all `layers` with one each.

    A device holding `l` layers needs `l * layer_bytes + fixed`. The proportional share
    (llama.cpp's own rule, by free memory) ignores the fixed part, so a small device can
    be given more than it holds: it is capped, and the layers it cannot take go, one at
    a time, to the device with the most room left. Integer arithmetic, ties by position:
    the same inputs give the same split.
    """
    if layers < len(free) or not free:
        return None
    room = [f - fixed for f in free]
    caps = [0 if r < 0 else layers if layer_bytes <= 0 else r // layer_bytes for r in room]
    if min(caps) < 1 or sum(caps) < layers:
        return None
    total = sum(free)
    if total <= 0:
        return None
    share = [min(layers * f // total, cap) for f, cap in zip(free, caps, strict=True)]
    # the rounded-down shares leave a few layers: largest remainders first (Hamilton)
    order = sorted(range(len(free)), key=lambda i: (-(layers * free[i] % total), i))
    left = layers - sum(share)
    for i in order:
        if left and share[i] < caps[i]:
            share[i] += 1
            left -= 1
    while left:  # what capped devices could not take: the most room left first
        i = max(range(len(free)), key=lambda j: (room[j] - share[j] * layer_bytes
                                                 if share[j] < caps[j] else -1, -j))
        share[i] += 1
        left -= 1
    for i in range(len(share)):  # every device chosen holds at least one layer
        if share[i] == 0:
            j = max(range(len(share)), key=lambda k: (share[k], -k))
            share[j] -= 1
            share[i] = 1
    return tuple(share)


def same_split(a: Claim, b: Claim) -> bool:
    """Whether two nodes' claims split the same layers the same way (one split over all)."""
    return (a.layers, a.layer_bytes, a.device_bytes) == (b.layers, b.layer_bytes, b.device_bytes)


def _layers_held(free: list[int], claim: Claim) -> list[int]:
    """Whole layers each device can hold (what is left after its fixed part)."""
    if claim.layer_bytes <= 0:
        return [claim.layers for _ in free]
    return [max(0, f - claim.device_bytes) // claim.layer_bytes for f in free]


def offload_layers(claim: Claim, free: list[int]) -> int:
    """Layers a partial offload puts on these devices: as many as they hold in whole
    layers, at most what `offload`/`-ngl` allows; fewer than it needs is returned as is
    (the split then fails)."""
    low, high = claim.offload_range()
    held = min(high, sum(_layers_held(free, claim)))
    return held if held >= max(low, 1) else 0


def offload_devices(free: list[int], claim: Claim) -> int:
    """How many of these devices (emptiest first) a partial offload takes: the fewest that
    hold as many layers as all of them could."""
    held = _layers_held(free, claim)
    want = min(claim.offload_range()[1], sum(held))
    total = 0
    for k, h in enumerate(held, start=1):
        total += h
        if total >= want:
            return k
    return len(held)
