"""Fixtures of the facts tests: the loopback fleet factory (tests/fleet.py)."""

from fleet import make_fleet  # noqa: F401
