"""generalization package."""
