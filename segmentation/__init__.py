"""segmentation (see README)."""
