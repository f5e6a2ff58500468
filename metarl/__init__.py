"""metarl package."""
