"""`stack-agent` that also writes one line per start attempt, so a test can count them.

    STACK_TEST_START_ATTEMPTS=FILE python tests/agent/counting_agent.py --config agent.toml

It wraps `Runner._try_start`, the one place where the agent tries to start a backend
(resolve the model, build the command, check the binary and the port, spawn), and
appends the instance id to FILE before each call. A failure that is never spawned (a
missing binary) leaves nothing else outside to count; a renamed method fails loudly
here instead of counting nothing.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from agent.main import main
from agent.runner import Runner

_try_start = Runner._try_start


def _counted(self: Runner, *args: Any, **kwargs: Any) -> Any:
    with open(os.environ["STACK_TEST_START_ATTEMPTS"], "a") as out:
        out.write(self.inst.id + "\n")
    return _try_start(self, *args, **kwargs)


Runner._try_start = _counted  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.exit(main())
