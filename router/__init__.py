"""modelstack router."""
