"""classification (see README)."""
