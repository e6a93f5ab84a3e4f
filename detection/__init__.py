"""detection (see README)."""
