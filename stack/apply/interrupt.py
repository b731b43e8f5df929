"""Ctrl-C during apply: stop once the steps in progress are done, or at once on the second."""

from __future__ import annotations

import os
import signal
import threading
from typing import Any


class Interrupt:
    """Ctrl-C while apply changes hosts: the first stops apply once the steps in progress
    are done on every host (no step is left half done, no command keeps running on a host
    after apply exits), the second stops it at once. `check()` raises KeyboardInterrupt
    once one was asked for; apply calls it between steps."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> Interrupt:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)  # the second one: at once
        os.write(2, b"interrupted: stopping once the steps in progress are done "
                    b"(Ctrl-C again stops at once)\n")

    def check(self) -> None:
        if self.requested:
            raise KeyboardInterrupt
