"""transformers package."""
