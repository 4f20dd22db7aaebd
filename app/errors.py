"""Domain exceptions. One handler in app.api renders them as RFC 9457 problem details."""

from __future__ import annotations


class CbirError(Exception):
    """Base class: ``status`` is the HTTP status, ``code`` a stable snake_case identifier."""

    status: int = 400
    code: str = "bad_request"
    title: str = "Bad request"

    def __init__(self, detail: str, **extra: object) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = extra


class NotFound(CbirError):
    status, code, title = 404, "not_found", "Not found"


class CollectionNotFound(NotFound):
    code = "collection_not_found"
    title = "Collection not found"


class ImageNotFound(NotFound):
    code = "image_not_found"
    title = "Image not found"


class JobNotFound(NotFound):
    code = "job_not_found"
    title = "Job not found"


class Conflict(CbirError):
    status, code, title = 409, "conflict", "Conflict"


class JobFinished(Conflict):
    code = "job_finished"


class CollectionExists(Conflict):
    code = "collection_exists"
    title = "Collection already exists"


class EmbedderNotReady(Conflict):
    code = "embedder_not_ready"
    title = "Embedder has no trained checkpoint"


class InvalidRequest(CbirError):
    status, code, title = 422, "invalid_request", "Invalid request"


class UnknownEmbedderName(InvalidRequest):
    code = "unknown_embedder"
    title = "Unknown embedder"


class InvalidEmbedderOptions(InvalidRequest):
    code = "invalid_embedder_options"
    title = "Invalid embedder options"


class WeightsMissing(CbirError):
    """Pretrained weights are not on this machine; the detail says which file to put where."""

    status, code, title = 422, "weights_missing", "Pretrained weights missing"


class FolderNotAllowed(CbirError):
    status, code, title = 403, "folder_not_allowed", "Folder not allowed"


class ImageRejected(CbirError):
    """The bytes are not an image we accept; subclasses say why."""

    status, code, title = 422, "not_an_image", "Not an image"


class UnsupportedImage(ImageRejected):
    status, code, title = 415, "unsupported_format", "Unsupported image format"


class ImageTruncated(ImageRejected):
    code = "image_truncated"
    title = "Truncated image"


class ImageTooLarge(ImageRejected):
    status, code, title = 413, "image_too_large", "Image too large"


class PayloadTooLarge(CbirError):
    status, code, title = 413, "payload_too_large", "Request body too large"


class EmptyUpload(CbirError):
    status, code, title = 400, "empty_upload", "Empty upload"


class BadMultipart(CbirError):
    """A multipart body with fields repeated or missing."""

    status, code, title = 400, "bad_multipart", "Bad multipart body"


class UnsupportedArchive(CbirError):
    status, code, title = 415, "unsupported_archive", "Unsupported archive"


class IndexMismatch(CbirError):
    status, code, title = 503, "index_unavailable", "Index not ready"


class DatabaseUnavailable(CbirError):
    """The database could not be reached or dropped the connection; retrying later may work."""

    status, code, title = 503, "database_unavailable", "Database unavailable"
