"""modelstack deploys."""
