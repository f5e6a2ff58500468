"""generalization tests."""
