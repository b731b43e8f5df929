"""The pyinfra operation every deploy step runs through.

`step(...)` yields exactly what `deploys.steps` decided: uploads (each after creating its
folder) and shell commands, or `host.noop(reason)` when the host is already right. One
operation per step key on every host keeps pyinfra's operation order identical across
hosts.
"""

from __future__ import annotations

import io
import shlex
from collections.abc import Generator
from pathlib import PurePosixPath
from typing import Any

from pyinfra.api.command import FileUploadCommand, StringCommand
from pyinfra.api.operation import operation
from pyinfra.context import host

from deploys.steps import Step


@operation(is_idempotent=True)
def step(item: Step) -> Generator[Any, None, None]:
    """Run one deploy step on the current host (or note why nothing is needed)."""
    if item.blocked is not None:
        # an operation cannot fail at prepare time without stopping every host: fail here
        message = f"{item.blocked.reason}; hint: {item.blocked.hint}"
        yield StringCommand(f"echo {shlex.quote(message)} >&2; exit 3")
        return
    if not item.changes:
        host.noop(item.noop)
        return
    for upload in item.uploads:
        parent = str(PurePosixPath(upload.dest).parent)
        # the file exists first, readable by its owner alone: the upload writes into it
        # and keeps that mode, so a token is never readable by others, not even before
        # its step sets the final mode
        yield StringCommand(f"mkdir -p {shlex.quote(parent)} && "
                            f"(umask 077 && : > {shlex.quote(upload.dest)})")
        if upload.content is not None:
            yield FileUploadCommand(io.BytesIO(upload.content), upload.dest)
        else:
            yield FileUploadCommand(str(upload.path), upload.dest)
    for command in item.commands:
        yield StringCommand("sh", "-c", shlex.quote(command))
