"""modelstack stack."""
