"""The stack secret and API keys.

The stack secret is the one value per stack from which per-instance backend keys and
agent tokens are derived (HMAC), so nothing secret has to be written into stack.toml or
plans. It comes from the `STACK_SECRET` environment variable (CI) or the file
`.stack/secret` next to stack.toml, created on first use (mode 0600, 32 random bytes).

API keys are shown once and stored only as `hash_key(key)`; the router hashes the key a
client presents with the same function.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import stat
import subprocess
import sys
from pathlib import Path

from stack.errors import ConfigError, Problem

SECRET_ENV = "STACK_SECRET"
SECRET_FILE = Path(".stack") / "secret"


def _urlsafe(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def generate_key() -> str:
    """A new API key: `sk-` + 32 random bytes, URL-safe base64 without padding."""
    return "sk-" + _urlsafe(secrets.token_bytes(32))


def hash_key(key: str) -> str:
    """The form a key is stored in: `sha256:` + the hex digest of the key's UTF-8 bytes."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def derive_key(secret: bytes, purpose: str) -> str:
    """A key for one purpose (`instance:gpu-01:qwen-0`, `agent:gpu-01`), stable per secret."""
    digest = hmac.new(secret, purpose.encode(), hashlib.sha256).digest()
    return "sk-" + _urlsafe(digest)


def stack_secret(stack_dir: Path) -> bytes:
    """The stack secret: `$STACK_SECRET`, else `.stack/secret` beside stack.toml (made once)."""
    from_env = os.environ.get(SECRET_ENV)
    if from_env:
        return from_env.encode()
    path = stack_dir / SECRET_FILE
    try:
        return _read_secret(path)
    except FileNotFoundError:
        pass
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process made it first: use theirs
        return _read_secret(path)
    value = secrets.token_bytes(32)
    with os.fdopen(fd, "wb") as handle:
        handle.write(value)
    return value


def tracked_secret(stack_dir: Path) -> Problem | None:
    """A warning when git tracks `.stack/secret`: whoever reads the repository can then
    derive every backend key and agent token. None when it is not (or there is no git)."""
    try:
        found = subprocess.run(["git", "-C", str(stack_dir), "ls-files", "--", str(SECRET_FILE)],
                               capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if found.returncode != 0 or not found.stdout.strip():
        return None
    return Problem(
        f"`{SECRET_FILE}` is tracked by git: anyone who can read the repository can derive "
        "every backend key and agent token of this stack",
        f"run `git rm --cached {SECRET_FILE}`, add `.stack/` to .gitignore, then make a new "
        "secret (delete the file; the next apply rolls new keys out) and keep the old one "
        "out of the history.")


def warn_tracked_secret(stack_dir: Path) -> None:
    """Print the `tracked_secret` warning on stderr (plan and apply)."""
    problem = tracked_secret(stack_dir)
    if problem is not None:
        print(problem.render("warning: "), file=sys.stderr)


def _read_secret(path: Path) -> bytes:
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"`{path}` can be read by other users (mode {stat.S_IMODE(mode):o})",
            hint=f"run `chmod 600 {path}`; anyone who reads it can call the backends.",
        )
    value = path.read_bytes()
    if len(value) < 16:
        raise ConfigError(
            f"`{path}` holds {len(value)} bytes, too short for a stack secret",
            hint="delete it to have a new one made (running instances get new keys), "
            f"or set `{SECRET_ENV}`.",
        )
    return value
