"""Response and request models, named by role."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, Field

from index.rerank import DEFAULT_SHRINKAGE


def _as_utc(value: datetime) -> datetime:
    """Stored times are UTC, but SQLite gives them back naive: say so (RFC 3339 needs an offset)."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


UtcDateTime = Annotated[datetime, AfterValidator(_as_utc)]


class Problem(BaseModel):
    """RFC 9457 problem details."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str
    code: str


class CollectionCreate(BaseModel):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9_-]*$", examples=["holidays"])
    embedder: str = Field(
        "cdae",
        max_length=255,
        examples=["cdae", "efficientnet_lite0", "efficientnet_lite0:input=whole,sizes=224+320,flip=1"],
        description="an embedder spec: a registered name, optionally with options name:key=value,...",
    )


class SearchOptionsIn(BaseModel):
    qe: int = Field(0, ge=0, le=20, description="alpha-query-expansion depth: 0 is off")
    qe_alpha: float = Field(3.0, ge=0, le=10, description="weight exponent of the expanded neighbours")


class WhiteningIn(BaseModel):
    dim: int = Field(ge=1, le=4096, examples=[128], description="components kept (Babenko: 16 to 512)")
    shrinkage: float = Field(
        DEFAULT_SHRINKAGE,
        ge=0,
        le=1,
        description="blend eigenvalues towards their mean (0: plain PCA-whitening)",
    )


class CheckpointOut(BaseModel):
    id: int
    version: str
    sha256: str
    created_at: str
    config: dict[str, Any]
    metrics: dict[str, Any]


class SelectionRowOut(BaseModel):
    name: str = Field(description="pixels, pca64, cdae-default, cdae-strokes, lenet5 ...")
    kind: str = Field(description="baseline (untrained), unsupervised or supervised")
    stage: str = Field(
        description="baseline, screen (a sample, few epochs) or full (every non-held-out image)"
    )
    p_at_10: float | None = Field(description="P@10 of the held-out queries; null when not validated")
    map_all: float | None = Field(description="mAP@all of the held-out queries; null when not validated")
    epochs: int
    images: int = Field(description="images it was fitted on")
    seconds: float
    chosen: bool
    notes: str
    checkpoint_id: int | None = None


class SelectionOut(BaseModel):
    winner: str
    validated: bool = Field(
        description="False: too few labels to hold out; the default CDAE (or the head) was not measured"
    )
    reason: str
    held_out: int = Field(description="held-out labelled images (the queries)")
    database: int = Field(description="labelled images they were ranked against")
    table: list[SelectionRowOut]


class RuntimeOut(BaseModel):
    """What computes a pretrained CNN's codes (CBIR_CNN_RUNTIME)."""

    embedder: str | None = None
    version: str | None = None
    requested: str = Field(description="torch, onnx or auto (CBIR_CNN_RUNTIME)")
    active: str = Field(description="torch or onnx: what computes the codes now")
    state: str = Field(description="pending (torch until the choice is made in the background) or chosen")
    reason: str | None = Field(
        None,
        description="requested, measured (auto, timed at this start), cached (auto, timed at an "
        "earlier one), cpu_only, unavailable (onnxruntime missing) or export_failed",
    )
    torch_img_s: float | None = Field(None, description="auto: torch's images/s on the timed batch")
    onnx_img_s: float | None = Field(None, description="auto: ONNX Runtime's images/s on the timed batch")
    shape: list[int] | None = Field(None, description="auto: the timed batch's shape (n, 3, H, W)")


class CollectionOut(BaseModel):
    name: str
    embedder: str
    embedder_version: str | None
    dim: int | None
    checkpoint: CheckpointOut | None
    image_count: int
    embedded_count: int
    index_size: int
    index_factory: str
    search_options: SearchOptionsIn
    whitening: int | None = Field(None, description="dims of the PCA-whitening served, if any")
    ready: bool = Field(description="True when the collection can be searched")
    created_at: UtcDateTime
    selection: SelectionOut | None = Field(
        None,
        description="how the served embedder was chosen on held-out labels (`cbir train cdae`, "
        "`cbir train classifier --arch head`), if it was",
    )
    tuning: dict[str, Any] | None = Field(
        None,
        description="automatic search tuning of a pretrained-CNN collection: auto (the switch), "
        "state, steps (whitening, qe: on/off, validated, reason), table (mAP per setting on the "
        "validation), validated, fitted_on (images), threshold",
    )
    runtime: RuntimeOut | None = Field(
        None,
        description="what computes a pretrained CNN collection's codes; null for other embedders and "
        "until the embedder is first loaded (by a search, an upload or an import)",
    )


class TuningIn(BaseModel):
    auto: bool = Field(description="tune whitening and query expansion by itself after imports")


class CollectionList(BaseModel):
    collections: list[CollectionOut]


class ImageOut(BaseModel):
    id: int
    collection: str
    sha256: str
    format: str
    width: int
    height: int
    byte_size: int
    original_name: str | None
    metadata: dict[str, Any]
    created_at: UtcDateTime
    image_url: str
    thumbnail_url: str
    # Only with GET /images/{id}?include=embedding, and only once the image has a vector.
    embedding: list[float] | None = Field(
        None,
        exclude_if=lambda value: value is None,
        description="with include=embedding: the stored vector of the collection's served embedder "
        "(float32, L2-normalised); absent otherwise, and while the image has no vector yet",
    )


class ImageCreated(BaseModel):
    id: int
    created: bool
    image: ImageOut


class HitOut(BaseModel):
    rank: int
    id: int
    score: float
    label: str | None
    metadata: dict[str, Any]
    original_name: str | None
    image_url: str
    thumbnail_url: str


class ExampleOut(BaseModel):
    """One example of a search by examples: a stored image's id or an upload's file name."""

    image_id: int | None = None
    file: str | None = None
    weight: float = Field(description="its factor in the combined query: its side's weight / count")


class ExamplesQueryOut(BaseModel):
    """What a search by examples combined: normalize(sum of weight x code, negatives subtracted)."""

    positive: list[ExampleOut]
    negative: list[ExampleOut]
    positive_weight: float
    negative_weight: float


class SearchResponse(BaseModel):
    collection: str
    k: int
    query_image_id: int | None = None
    # Only in the answer of a search by examples: a single-image search's answer is unchanged.
    query: ExamplesQueryOut | None = Field(
        None, exclude_if=lambda value: value is None, description="a search by examples: what it combined"
    )
    hits: list[HitOut]
    timings_ms: dict[str, float] = Field(description="decode, embed, search, fetch and total")


class BatchEntryOut(BaseModel):
    """One query's answer: its hits, or the problem that kept it from being searched."""

    index: int = Field(description="the query's position among the request's file and image_id parts")
    file: str | None = Field(None, description="an uploaded query: its file name")
    image_id: int | None = Field(None, description="a stored query: its id (left out of its hits)")
    hits: list[HitOut]
    error: Problem | None = Field(None, description="why this query has no hits (the others are answered)")


class BatchSearchResponse(BaseModel):
    collection: str
    k: int
    results: list[BatchEntryOut] = Field(description="one per query, in the order they were sent")
    timings_ms: dict[str, float] = Field(description="the whole batch: decode, embed, search, fetch, total")


class DatasetImport(BaseModel):
    """Exactly one of: a built-in dataset; a folder on the server under one of CBIR_IMPORT_ROOTS
    (image folder, MNIST-format IDX files or a Holidays-style folder); a manifest file there."""

    model_config = {"extra": "forbid"}

    dataset: str | None = Field(None, examples=["mnist"])
    split: str = Field("train", examples=["train", "test", "all"])
    folder: str | None = Field(None, max_length=4096, examples=["/srv/photos/holidays"])
    root: str | None = Field(
        None,
        max_length=255,
        description='a folder by import root name ("photos" in CBIR_IMPORT_ROOTS=photos=/srv/photos) '
        "and a relative path under it: no absolute path, no '..'",
        examples=["photos"],
    )
    path: str = Field("", max_length=4096, description="with root: the folder under it", examples=["2024"])
    layout: str = Field(
        "auto",
        description="for a folder: images (subfolder names are labels), idx (MNIST-format IDX files), "
        "holidays (groundtruth.json beside the images) or auto",
        examples=["auto", "images", "idx", "holidays"],
    )
    manifest: str | None = Field(
        None,
        max_length=4096,
        description="a CSV (path, label, other columns as metadata) or JSON-lines file under the roots",
        examples=["/srv/photos/manifest.csv"],
    )
    urls: list[str] | None = Field(
        None,
        description="http(s) URLs of images on public hosts (at most CBIR_MAX_URLS); each is reported "
        "in the job: blocked_destination, bad_scheme, invalid_url, timeout, remote_too_large ...",
        examples=[["https://example.org/cat.jpg"]],
    )


class EmbedderChange(BaseModel):
    """Switch the collection to another (pretrained) embedder: re-embedded as a job."""

    model_config = {"extra": "forbid"}

    embedder: str = Field(..., min_length=1, max_length=255, examples=["efficientnet_lite0:pooling=rmac"])


class JobAccepted(BaseModel):
    job_id: str
    state: str
    status_url: str
    result_url: str | None = Field(
        default=None, description="where the result is read once the job has succeeded"
    )


class JobError(BaseModel):
    item: str | None
    code: str | None
    detail: str | None


class JobOut(BaseModel):
    id: str
    kind: str
    collection: str | None
    state: str
    params: dict[str, Any]
    total: int | None
    done: int
    added: int
    duplicates: int
    failed: int
    errors: list[JobError]
    error: str | None
    resumes: int = Field(
        0, description="how many times a restart or crash interrupted the job and it resumed at its cursor"
    )
    images_per_second: float | None
    eta_seconds: float | None = Field(
        None, description="while running: seconds left at the current rate (None when unknown)"
    )
    created_at: UtcDateTime
    started_at: UtcDateTime | None
    finished_at: UtcDateTime | None


class JobList(BaseModel):
    jobs: list[JobOut]


class CollectionHealth(BaseModel):
    name: str
    images: int
    indexed: int


class Health(BaseModel):
    status: str = Field(description='"ok", or "degraded" while anything is listed in degraded')
    version: str
    device: str
    collections: list[CollectionHealth]
    degraded: list[str] = Field(
        default_factory=list,
        description="what works less than fully: checkpoint_failed (an index checkpoint could not be "
        "written; the database has every image), read_only (writes are refused), and the codes of "
        "/ready's problems (vectors_refused, bad_index_factory, bad_index_params, index_unavailable)",
    )
    runtimes: list[RuntimeOut] = Field(
        default_factory=list, description="the runtime of every pretrained CNN embedder loaded so far"
    )


class IndexProblemOut(BaseModel):
    """Something a collection's index cannot serve as stored; the rest of the service serves."""

    collection: str
    code: str = Field(
        description="vectors_refused (stored rows the index cannot hold, set aside), bad_index_factory "
        "(the stored kind is not built: exact search serves), bad_index_params (stored search "
        "parameters ignored), index_unavailable (the index cannot be opened: its searches answer 503)"
    )
    detail: str
    hint: str = Field(description="what to do about it")
    image_ids: list[int] = Field(default_factory=list, description="vectors_refused: the first 100 images")
    count: int = Field(0, description="vectors_refused: how many images are set aside")

    @classmethod
    def of(cls, problem: Any) -> IndexProblemOut:
        """From an app.indexing.problems.IndexProblem, or its fields as a dict."""
        fields = dict(problem) if isinstance(problem, dict) else vars(problem)
        ids = list(fields.get("image_ids") or ())
        return cls(**{**fields, "image_ids": ids[:100], "count": len(ids)})


class Readiness(BaseModel):
    """200 when every collection's index can serve; 503 while one is being built from the database.
    ``problems`` never make it 503: every collection they do not name serves, and so does the rest
    of a collection whose stored rows were set aside."""

    ready: bool
    rebuilding: dict[str, str] = Field(
        default_factory=dict, description="collection -> why its index is being built (503 meanwhile)"
    )
    problems: list[IndexProblemOut] = Field(
        default_factory=list,
        description="what a stored row or setting keeps an index from serving, and what to do",
    )


class LabelCount(BaseModel):
    label: str
    count: int


class LabelList(BaseModel):
    collection: str
    total: int = Field(description="images in the collection")
    distinct: int = Field(description="distinct labels (the list may show fewer)")
    unlabelled: int
    labels: list[LabelCount] = Field(description="most common first")


class MapPointOut(BaseModel):
    id: int
    x: float
    y: float
    label: str | None


class MapOut(BaseModel):
    collection: str
    embedder_version: str
    method: str
    methods: list[str] = Field(description="methods available on this server (umap needs umap-learn)")
    sample: int = Field(description="points drawn (evenly spread over the collection by id)")
    total: int = Field(description="images with a code in the collection")
    explained_variance: list[float] | None
    points: list[MapPointOut]


class CompareSide(BaseModel):
    embedder: str
    source: str = Field(description="'stored codes' or 'computed for this comparison'")
    hits: list[HitOut]
    timings_ms: dict[str, float]


class CompareResponse(BaseModel):
    collection: str
    k: int
    query_image_id: int | None
    sample: int = Field(description="images both sides searched (evenly spread over the collection)")
    total: int
    sides: list[CompareSide]


class IndexConfigIn(BaseModel):
    """The collection's index kind and search parameters; a field left out is unchanged, a
    parameter set to null goes back to the kind's default."""

    factory: str | None = Field(
        None,
        max_length=120,
        examples=["auto", "Flat", "HNSW32", "IVF1024,PQ32", "OPQ32,IVF1024,PQ32", "IVF1024,PQ32,RFlat"],
        description="auto (exact while small, then a graph, then re-ranked IVF-PQ) or a FAISS factory string",
    )
    ef_search: int | None = Field(None, ge=1, le=4096, description="HNSW: candidates kept while searching")
    nprobe: int | None = Field(None, ge=1, le=65536, description="IVF: inverted lists visited")
    k_factor: float | None = Field(None, ge=1, le=100, description="re-ranked kinds: k x this candidates")


class IndexOut(BaseModel):
    collection: str
    state: str = Field(description="ready, rebuilding (the old index serves), building (503 meanwhile), none")
    factory: str = Field(description="the collection's setting: auto or a FAISS factory string")
    kind: str | None = Field(description="the FAISS factory of the index serving now")
    ntotal: int
    dim: int | None
    memory_bytes: int
    tombstones: int = Field(description="deleted vectors excluded from search until the next rebuild")
    high_water_mark: int = Field(description="the largest image id the index holds (-1: none)")
    params: dict[str, Any] = Field(description="search parameters: ef_search, nprobe, k_factor")
    recall_at_10: float | None = Field(
        description="measured against exact search with held-out queries: 200 sampled stored vectors, "
        "each query's own image left out of both the exact and the index's top 10"
    )
    recall_measured_at: str | None
    built_at: str | None
    build_seconds: float | None
    rebuild: dict[str, Any] | None = Field(description="the background build in progress, if any")
    last_error: str | None
    problems: list[IndexProblemOut] = Field(
        default_factory=list, description="as in /ready, for this collection"
    )


class KeyCreate(BaseModel):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$", examples=["ci"])
    scope: Literal["read", "write", "admin"] = Field(description="read < write < admin")


class KeyOut(BaseModel):
    name: str
    scope: str
    prefix: str = Field(description="the first characters of the key, to tell keys apart")
    source: str = Field(description="database (cbir keys create, POST /keys) or config (CBIR_API_KEYS)")
    created_at: UtcDateTime | None
    revoked_at: UtcDateTime | None


class KeyCreated(BaseModel):
    key: KeyOut
    secret: str = Field(description="the API key itself: shown once, only its SHA-256 is stored")


class KeyList(BaseModel):
    keys: list[KeyOut]
