"""Vector search: FAISS indexes keyed by database image ids (numpy + FAISS only)."""

from index.checksum import id_checksum
from index.fileformat import IndexCorrupt
from index.search_params import SearchKnobs
from index.vector_index import VectorIndex

__all__ = ["IndexCorrupt", "SearchKnobs", "VectorIndex", "id_checksum"]
