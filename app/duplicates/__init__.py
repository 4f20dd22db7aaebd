"""Near-duplicate groups of a collection: a job finds every pair of images whose served codes are
within a cosine threshold (index/pairs.py), groups them (connected components) and stores the
groups; people resolve groups, and their resolutions outlive re-runs (docs/duplicates.md)."""
