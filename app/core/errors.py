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


class JobNotFinished(Conflict):
    """The job's result was asked for while it is queued or running, or after it failed."""

    code, title = "job_not_finished", "Job not finished"


class CollectionExists(Conflict):
    code = "collection_exists"
    title = "Collection already exists"


class EmbedderNotReady(Conflict):
    code = "embedder_not_ready"
    title = "Embedder has no trained checkpoint"


class InvalidRequest(CbirError):
    status, code, title = 422, "invalid_request", "Invalid request"


class OverBudget(InvalidRequest):
    """The work is estimated to take longer than its cost budget (CBIR_SYNC_COST_BUDGET_S for an
    answer now, CBIR_JOB_COST_BUDGET_S for a job); the detail gives both and what would fit."""

    code, title = "over_budget", "Over the cost budget"


class UnknownEmbedderName(InvalidRequest):
    code = "unknown_embedder"
    title = "Unknown embedder"


class InvalidEmbedderOptions(InvalidRequest):
    code = "invalid_embedder_options"
    title = "Invalid embedder options"


class BadIndexFactory(InvalidRequest):
    """An index factory string cbir does not build (index/factories.py), or numbers out of range."""

    code, title = "bad_index_factory", "Bad index factory"


class UnsupportedIndexKind(BadIndexFactory):
    """A valid index kind that the configured vector store (CBIR_VECTOR_STORE) cannot build, such as
    a PCA or refinement stage in Milvus, or IVF-PQ on milvus-lite: refused, never silently replaced."""

    code, title = "unsupported_index_kind", "Index kind not supported by the vector store"


class BadMetadata(InvalidRequest):
    """Metadata the service cannot store and serve back as JSON (app/core/usertext.py): NaN or
    infinity, a number past int64, nesting past the depth limit, text that is not UTF-8, a label
    that is not a string or a number."""

    code, title = "bad_metadata", "Bad metadata"


class BadName(InvalidRequest):
    """A file or member name that is not UTF-8 text (a lone surrogate) or holds a NUL."""

    code, title = "bad_name", "Bad file name"


class BadManifest(InvalidRequest):
    """A manifest that cannot be read as a whole (not UTF-8, not CSV, no path column, too large):
    uploaded, a 422; inside an archive, its report line and the job's error."""

    code, title = "bad_manifest", "Bad manifest"


class WeightsMissing(CbirError):
    """Pretrained weights are not on this machine; the detail says which file to put where."""

    status, code, title = 422, "weights_missing", "Pretrained weights missing"


class FolderNotAllowed(CbirError):
    status, code, title = 403, "folder_not_allowed", "Folder not allowed"


class PathOutsideRoot(FolderNotAllowed):
    """A server path that is not under an import root (``..``, absolute, a link out, or missing:
    the same answer either way, so the API cannot probe the file system)."""

    code, title = "path_outside_root", "Path outside the import roots"


class Unauthorized(CbirError):
    """No API key, or one that matches no key; ``headers`` carries the WWW-Authenticate challenge."""

    status, code, title = 401, "unauthorized", "Unauthorized"
    headers = {"WWW-Authenticate": 'APIKey realm="cbir", header="X-API-Key"'}


class Forbidden(CbirError):
    """A valid API key whose scope is below the one the operation needs."""

    status, code, title = 403, "forbidden", "Forbidden"


class AuthRequired(Forbidden):
    """A write on a service reachable from other machines while no API key exists (CBIR_AUTH=auto):
    no key can be presented yet, so a 403 that says how to create one, not a 401."""

    code, title = "auth_required", "An API key must be created first"


class RateLimited(CbirError):
    status, code, title = 429, "rate_limited", "Too many requests"

    def __init__(self, detail: str, *, retry_after: int) -> None:
        super().__init__(detail)
        self.headers = {"Retry-After": str(retry_after)}


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


class TooManyFrames(ImageRejected):
    """An animated file declaring more frames than CBIR_MAX_FRAMES (only the first is decoded)."""

    code, title = "too_many_frames", "Too many frames"


class DegenerateImage(ImageRejected):
    """The embedder gives this image no usable code: a zero vector (a constant image, all black) or
    one with NaN or infinity. Nothing is stored; no index could hold or search with it."""

    code, title = "degenerate_image", "Degenerate image"


class PayloadTooLarge(CbirError):
    status, code, title = 413, "payload_too_large", "Request body too large"


class BodyTimeout(CbirError):
    """The request body did not arrive in time (CBIR_BODY_TIMEOUT_S): a stalled or slow-drip client."""

    status, code, title = 408, "body_timeout", "Request body too slow"


class EmptyUpload(CbirError):
    status, code, title = 400, "empty_upload", "Empty upload"


class BadMultipart(CbirError):
    """A multipart body with fields repeated or missing."""

    status, code, title = 400, "bad_multipart", "Bad multipart body"


class UnsupportedArchive(CbirError):
    status, code, title = 415, "unsupported_archive", "Unsupported archive"


class BadArchive(CbirError):
    """A zip or tar (by its first bytes) that cannot be read: truncated or damaged."""

    status, code, title = 422, "bad_archive", "Damaged archive"


class TooManyMembers(CbirError):
    status, code, title = 413, "too_many_members", "Too many archive members"


class MemberRejected(CbirError):
    """One member of an import found bad while it was read (a bomb, a lying header, a file gone):
    the import reports it with this code and goes on."""

    status, code, title = 422, "member_rejected", "Member rejected"

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code


class UrlImportDisabled(CbirError):
    status, code, title = 403, "url_import_disabled", "URL import disabled"


class TooManyUrls(PayloadTooLarge):
    code, title = "too_many_urls", "Too many URLs"


class UrlRejected(CbirError):
    """A URL of an import that was not fetched, or whose fetch failed (app/ingest/sources/fetch.py):
    reported per item with the subclass's code."""

    status, code, title = 422, "url_rejected", "URL rejected"


class InvalidUrl(UrlRejected):
    code, title = "invalid_url", "Invalid URL"


class BadScheme(UrlRejected):
    code, title = "bad_scheme", "Scheme not fetched"


class BlockedDestination(UrlRejected):
    """This machine, its networks or another non-public address: never connected to."""

    status, code, title = 403, "blocked_destination", "Destination not allowed"


class RedirectBlocked(BlockedDestination):
    code, title = "redirect_blocked", "Redirect to a destination not allowed"


class TooManyRedirects(UrlRejected):
    code, title = "too_many_redirects", "Too many redirects"


class HostNotFound(UrlRejected):
    status, code, title = 502, "host_not_found", "Host not found"


class RemoteError(UrlRejected):
    """No connection, a status other than 200, a broken HTTP response."""

    status, code, title = 502, "remote_error", "Remote server error"


class RemoteTooLarge(UrlRejected):
    status, code, title = 413, "remote_too_large", "Remote file too large"


class FetchTimeout(UrlRejected):
    status, code, title = 504, "timeout", "Remote server too slow"


class UnsupportedEncoding(UrlRejected):
    status, code, title = 415, "unsupported_encoding", "Unsupported Content-Encoding"


class IndexMismatch(CbirError):
    status, code, title = 503, "index_unavailable", "Index not ready"


class IndexRebuilding(IndexMismatch):
    """The collection's index is being built from the database; answered 503 with Retry-After."""

    code = "index_rebuilding"
    title = "Index rebuilding"


class ReembedRequired(IndexMismatch):
    """The collection has images but none has a vector of its configured embedder version (an
    index file of another model cannot stand in): re-embed before searching."""

    code = "reembed_required"
    title = "Re-embedding required"


class DatabaseUnavailable(CbirError):
    """The database could not be reached or dropped the connection; retrying later may work."""

    status, code, title = 503, "database_unavailable", "Database unavailable"


class InsufficientStorage(CbirError):
    """The disk (or quota, or file size limit) is full: nothing of the write was kept."""

    status, code, title = 507, "insufficient_storage", "Insufficient storage"


class ReadOnly(CbirError):
    """Writes are off (CBIR_READ_ONLY) or the data folder turned read-only; reads keep working."""

    status, code, title = 503, "read_only", "Read-only"


class Overloaded(CbirError):
    """More uploads and searches are in flight than CBIR_MAX_PENDING_EMBEDS: refused at once."""

    status, code, title = 503, "overloaded", "Overloaded"


class DecodeMemoryFull(Overloaded):
    """The decode memory budget (CBIR_DECODE_MEMORY_BUDGET_BYTES) stayed full while the request
    waited: 503 ``overloaded`` with Retry-After."""

    def __init__(self, detail: str, *, retry_after: int) -> None:
        super().__init__(detail)
        self.headers = {"Retry-After": str(retry_after)}


class Cancelled(CbirError):
    """Long work stopped before its end: its client left, its job was cancelled or the service is
    shutting down (then a retry goes to the next process)."""

    status, code, title = 503, "cancelled", "Cancelled"
