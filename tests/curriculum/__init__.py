"""curriculum tests."""
