"""splice."""
