"""evolution package."""
