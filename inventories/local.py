"""This machine, through pyinfra's `@local` connector (no SSH).

Use it with `inventory = "inventories/local.py"` under `[stack]` in stack.toml.
"""

hosts = ["@local"]
