"""exploration package."""
