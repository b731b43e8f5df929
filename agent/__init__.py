"""modelstack agent."""
