"""The shared limit table under real contention: forked processes hammer one key."""

from __future__ import annotations

import os
import time

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
        passed = [int(line) for line in pipe]
    assert statuses == [0, 0, 0]
    assert sum(passed) == 3000, passed  # 6,000 tries, exactly the limit admitted
    # the window is the same from this process, and another key has its own slot
    mine = state.limiter(key, 3000, None)
    other = state.limiter("sha256:" + "cd" * 32, 500, None)
    assert mine is not None and other is not None
    assert not mine.admit(time.time(), 0).ok
    assert other.admit(time.time(), 0).ok
