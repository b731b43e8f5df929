"""The shared tables: limits under real contention (forked processes hammer one key), and
each replica's requests in flight summed over the workers."""

from __future__ import annotations

import asyncio
import os
import time

from router.config import Replica, RouterConfig
from router.replicas import ReplicaState
from router.shared import SharedState


def test_forked_workers_together_admit_exactly_the_rpm_limit() -> None:
    state = SharedState(3)
    key = "sha256:" + "ab" * 32
    read, write = os.pipe()
    children = []
    for _ in range(3):
        pid = os.fork()
        if pid == 0:  # a worker: 2,000 admissions as fast as it can, report how many passed
            code = 1
            try:
                os.close(read)
                limiter = state.limiter(key, 3000, None)
                assert limiter is not None
                passed = sum(limiter.admit(time.time(), 0).ok for _ in range(2000))
                os.write(write, b"%d\n" % passed)
                code = 0
            finally:
                os._exit(code)
        children.append(pid)
    os.close(write)
    statuses = [os.waitpid(pid, 0)[1] for pid in children]
    with os.fdopen(read) as pipe:
        admitted = [int(line) for line in pipe]
    assert statuses == [0, 0, 0]
    assert sum(admitted) == 3000, admitted  # 6,000 tries, exactly the limit admitted
    # the window is the same from this process, and another key has its own slot
    mine = state.limiter(key, 3000, None)
    other = state.limiter("sha256:" + "cd" * 32, 500, None)
    assert mine is not None and other is not None
    assert not mine.admit(time.time(), 0).ok
    assert other.admit(time.time(), 0).ok


def test_a_replicas_requests_in_flight_are_counted_over_every_worker() -> None:
    state = SharedState(2)
    config = RouterConfig.model_validate({"models": []})
    loop = asyncio.new_event_loop()
    try:
        def replica(slot: int, url: str = "http://10.0.0.1:9000") -> ReplicaState:
            return ReplicaState("m", Replica(id="m-0", url=url), config, loop, state, slot)

        first, second = replica(0), replica(1)  # the same replica in two workers
        first.started()
        assert (first.outstanding, second.outstanding) == (1, 0)
        assert first.in_flight() == second.in_flight() == 1
        second.started()
        second.started()
        assert first.in_flight() == 3
        first.ended()
        assert second.in_flight() == 2
        # worker 0 restarted: its cell starts again from zero, worker 1's stays
        first.started()
        restarted = replica(0)
        assert restarted.in_flight() == 2 and restarted.outstanding == 0
        # another replica (a new URL) has a row of its own
        moved = replica(1, "http://10.0.0.2:9000")
        assert moved.in_flight() == 0 and second.in_flight() == 2
    finally:
        loop.close()
