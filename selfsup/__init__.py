"""selfsup package."""
