"""The subcommands of `stack`, one module each."""
