"""The starter files `stack init` writes (`*.j2`, rendered with the stack's name)."""
