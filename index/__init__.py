"""Vector search: FAISS indexes keyed by database image ids (numpy + FAISS only)."""

from index.vector_index import IndexCorrupt, VectorIndex, id_checksum

__all__ = ["IndexCorrupt", "VectorIndex", "id_checksum"]
