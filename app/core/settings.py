"""Service settings: one class, read from ``CBIR_*`` environment variables, never at import time."""

from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

from pydantic import Field, SecretStr, field_serializer, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.core.hosts import parse_test_hosts
from app.core.memory import default_budget
from app.core.redaction import MARK, redact_url

# Every image within the default pixel caps fits: 40 megapixels of the costliest kind (an RGBA
# WebP, about 17 bytes a pixel at the peak: app/imaging/decode_cost.py) need 680 MB.
DEFAULT_MAX_DECODE_BYTES = 768 * 1024 * 1024


class Settings(BaseSettings):
    # Errors name the setting and why, never its value: CBIR_VECTOR_STORE (and others) can hold secrets.
    model_config = SettingsConfigDict(env_prefix="CBIR_", extra="ignore", hide_input_in_errors=True)

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    data_dir: Path = Path("./var")
    # Empty means a SQLite file in data_dir; any SQLAlchemy URL selects another database.
    database_url: str = ""
    # Where MNIST (and other datasets) are read from; missing files are downloaded with torchvision.
    datasets_dir: Path | None = None
    device: str = "auto"
    # One torch thread per serving process is the robust choice on small shared machines (FACTS.md).
    torch_threads: int = Field(1, ge=1)
    default_embedder: str = "cdae"
    # Server folders that POST /collections/{name}/imports {"folder": ...} may read, separated by
    # os.pathsep (":" on Linux); empty turns folder imports over HTTP off. An entry may be named,
    # "photos=/srv/photos", for {"root": "photos", "path": "sub/dir"}; an unnamed one is named by
    # its folder's name.
    import_roots: str = ""
    # Pretrained CNN weights: looked for here first, then in the torch hub cache, then downloaded.
    weights_dir: Path | None = None
    weights_download: bool = True
    # Where pretrained CNN codes are computed on the CPU: torch, onnx (ONNX Runtime, exports cached
    # in data_dir/onnx, torch when export or check fails) or auto: both timed once per embedder
    # version, device and thread count (a few batches, the choice cached with the export), the
    # faster kept; ONNX Runtime was 1.6-1.8x faster on a 2-core CPU (`cbir bench embed`). Chosen in
    # the background after the first load (torch until then); on a GPU, torch.
    cnn_runtime: Literal["torch", "onnx", "auto"] = "auto"

    # Input limits, enforced before and during decoding.
    max_upload_bytes: int = Field(20 * 1024 * 1024, ge=1024)
    max_archive_bytes: int = Field(2 * 1024 * 1024 * 1024, ge=1024)
    max_pixels: int = Field(40_000_000, ge=1)
    max_side: int = Field(16_384, ge=1)
    # Frames an animated file may declare (only the first is ever decoded).
    max_frames: int = Field(1000, ge=1)
    # Decode memory, estimated from the header (app/imaging/decode_cost.py): new input (an upload, a
    # search, an import member) needing more than max_decode_bytes is a 413 image_too_large (a JPEG
    # is first decoded at 1/2, 1/4 or 1/8 scale where that fits); 0: 768 MiB, which every image
    # within the default pixel caps fits. A stored file is never refused for its bytes. Every
    # decode reserves its estimate from decode_memory_budget_bytes, shared by the process (0: a
    # quarter of the memory, at most 512 MiB per core; a stored file over it waits for all of it);
    # a request waits up to decode_budget_wait_s, then gets 503 overloaded (Retry-After); a job waits.
    max_decode_bytes: int = Field(0, ge=0)
    decode_memory_budget_bytes: int = Field(0, ge=0)
    decode_budget_wait_s: float = Field(2.0, ge=0)
    # Transparent pixels are composited on this colour (any CSS colour) before embedding.
    alpha_background: str = "#ffffff"
    max_k: int = Field(100, ge=1)
    # Archives are read member by member, never extracted. A member over max_member_bytes (or
    # max_upload_bytes, the smaller) or inflating more than max_compression_ratio times its
    # compressed size is rejected; more members than max_archive_members is a 413; members after
    # max_total_uncompressed bytes are rejected unread. Real photo archives stay far below these.
    max_archive_members: int = Field(1_000_000, ge=1)
    max_member_bytes: int = Field(20 * 1024 * 1024, ge=1024)
    max_total_uncompressed: int = Field(8 * 1024 * 1024 * 1024, ge=1024)
    max_compression_ratio: float = Field(100.0, ge=1.0)
    # A server folder import stops (limit_reached) after this many files.
    max_folder_files: int = Field(1_000_000, ge=1)
    # Index rebuilds of at most this many vectors run in the request that needs them (exact
    # search builds in well under a second); larger ones run in the background, with 503s
    # (Retry-After) from that collection's searches until the new index serves.
    index_sync_rebuild_max: int = Field(50_000, ge=0)
    # Where vectors live: "faiss" (or empty) keeps an in-process FAISS index per collection, saved
    # under data_dir/indexes; "milvus://HOST:PORT" (or http(s)://HOST:PORT), optionally with
    # "?token=USER:PASSWORD&db=NAME", keeps them in Milvus, shared by every replica. The token is
    # shown as "…" by the settings' repr and JSON (``shown_vector_store``); the attribute keeps it.
    vector_store: str = "faiss"
    # The first part of every Milvus collection name this deployment creates, so that several
    # deployments (or test runs) can share one Milvus.
    vector_store_prefix: str = Field("cbir", pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")

    # Demo collection built by `cbir demo` / `make run`.
    demo_collection: str = "mnist"
    demo_epochs: int = Field(0, ge=0)  # 0: the CDAE preset's recommended epoch count
    embed_batch_size: int = Field(256, ge=1)
    # A pretrained-CNN collection is tuned by itself (PCA-whitening, QE where validated; see
    # app/learning/autotune.py) at the end of an import once it holds this many images (measured
    # on Holidays in docs/photos.md), and again each time it has doubled since.
    autotune_min_images: int = Field(300, ge=2)
    # Bulk imports: images per committed batch, decoding threads, and how many chunks may wait
    # between stages (bounded queues keep memory flat whatever the archive size).
    import_batch_size: int = Field(256, ge=1, le=10_000)
    import_workers: int = Field(0, ge=0, le=64)  # 0: processes: cores - 1; threads: cores, at most 4
    # Decode and embed imports in worker processes on the CPU (threads when off, or on a GPU).
    import_processes: bool = True
    import_queue_depth: int = Field(2, ge=1, le=64)
    # Imports from URLs ({"urls": [...]}, app/ingest/sources/fetch.py): only public addresses on these
    # ports are fetched; each URL gets url_timeout_s to connect and between reads and
    # url_deadline_s in all (redirects included), the whole list url_job_deadline_s.
    url_import_enabled: bool = True
    max_urls: int = Field(1000, ge=1, le=100_000)
    url_ports: list[int] = Field(default_factory=lambda: [80, 443])
    url_timeout_s: float = Field(10.0, gt=0)
    url_deadline_s: float = Field(30.0, gt=0)
    url_job_deadline_s: float = Field(3600.0, gt=0)
    # TEST ONLY: {"fixture.test": "127.0.0.1:8123"} lets URLs naming that host reach that address
    # without the SSRF checks (a local fixture server). Never set it in production.
    url_allow_test_hosts: dict[str, str] = Field(default_factory=dict)
    # Serve searches only: writes answer 503 read_only, SQLite is opened with mode=ro, nothing is
    # written to the data folder (which may be a read-only mount, a replica or a snapshot).
    read_only: bool = False
    # What `cbir serve` runs: "all" (the API and the jobs, one process: the default), "api" (the API
    # only; jobs wait in the database for a `cbir worker`). Separate roles need PostgreSQL and a
    # shared vector store (docs/scaling.md).
    role: Literal["all", "api"] = "all"
    # A worker holds each job it runs with a lease it renews; a job whose lease has run out (its
    # worker died) is taken over by another worker at its high-water mark.
    job_lease_seconds: float = Field(30.0, ge=2, le=3600)
    # How often a worker looks for queued jobs (and a holder for cancels of its jobs).
    job_poll_seconds: float = Field(1.0, gt=0, le=60)
    # Uploads and searches decoding and embedding at once; more get an immediate 503 overloaded
    # (Retry-After) instead of queueing into timeouts. 0: 8 per core, 8 to 32 (each waits on a
    # thread of the server's pool of 40).
    max_pending_embeds: int = Field(0, ge=0)
    # Cost budgets (app/embedding/cost.py), in estimated seconds of work (images to embed x the
    # embedder's measured seconds per image, plus search and fitting terms). Within
    # sync_cost_budget_s a compare, map, evaluation or whitening is done in the request; over it an
    # evaluation or whitening runs as a job (202), a compare or map is refused (422 over_budget,
    # naming the sample that fits). A job estimated over job_cost_budget_s is refused too.
    sync_cost_budget_s: float = Field(5.0, ge=0)
    job_cost_budget_s: float = Field(3600.0, ge=0)

    # Access (app/api/security.py). auto: keys are required as soon as one exists (`cbir keys
    # create`) or CBIR_API_KEYS is set, so a fresh offline install works keyless; on: always (no
    # keys: every write refused); off: never. Scopes: read < write < admin.
    # auto also refuses writes (403 auth_required) while no key exists on a service reachable from
    # other machines: CBIR_HOST not loopback, or a request arriving on a non-loopback address.
    auth: Literal["auto", "on", "off"] = "auto"
    # `cbir serve` on a first start with no key at all (none stored, CBIR_API_KEYS empty): create
    # the admin key "admin" and print it once (docker-compose.yml sets it).
    create_admin_key: bool = False
    # Reads (GET, search, compare) need a read key too; the HTML pages and /health never do.
    search_requires_key: bool = False
    # GET /metrics needs a read key while keys are enforced; on: open to anyone who reaches the
    # port (a Prometheus on a private network without a key).
    metrics_public: bool = False
    # Keys given in configuration: SCOPE:SECRET entries separated by commas, e.g.
    # "admin:s3cret-of-at-least-16-chars,read:another-long-secret".
    api_keys: SecretStr = SecretStr("")
    # Requests per minute per key (per client address without one), 0: no limit; a burst of up to
    # rate_limit_burst requests (0: as many as the per-minute rate) is allowed at once.
    rate_limit_per_minute: int = Field(0, ge=0)
    rate_limit_burst: int = Field(0, ge=0)

    # HTTP layer (app/api/limits.py, app/api/headers.py). A request body must arrive within
    # body_timeout_s, plus one second per 64 KiB received (a slow-drip client gets a 408).
    body_timeout_s: float = Field(30.0, gt=0)
    # Origins allowed to call the API from a browser, e.g. ["https://app.example"] (JSON in the
    # environment); empty: no CORS headers at all. "*" with credentials is refused at start.
    cors_origins: list[str] = Field(default_factory=list)
    cors_allow_credentials: bool = False

    @model_validator(mode="after")
    def _cors_safe(self) -> Settings:
        check_cors(self.cors_origins, allow_credentials=self.cors_allow_credentials)
        return self

    @field_validator("import_roots")
    @classmethod
    def _unique_root_names(cls, value: str) -> str:
        names = [name for name, _ in parse_import_roots(value)]
        if len(set(names)) != len(names):
            twice = sorted({name for name in names if names.count(name) > 1})
            raise ValueError(
                f"CBIR_IMPORT_ROOTS names {twice} more than once: name them, e.g. a=/a/photos:b=/b/photos"
            )
        return value

    @field_validator("vector_store")
    @classmethod
    def _vector_store(cls, value: str) -> str:
        return check_vector_store(value)

    @field_serializer("vector_store")
    def _shown_vector_store(self, value: str) -> str:
        return shown_vector_store(value)

    def __repr_args__(self) -> Any:
        for name, value in super().__repr_args__():
            yield name, shown_vector_store(value) if name == "vector_store" else value

    @property
    def vector_store_backend(self) -> str:
        """``faiss`` or ``milvus``."""
        return "faiss" if self.vector_store == "faiss" else "milvus"

    @field_validator("data_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @field_validator("url_ports")
    @classmethod
    def _ports(cls, value: list[int]) -> list[int]:
        if not all(1 <= port <= 65535 for port in value):
            raise ValueError(f"url_ports must be TCP ports (1-65535), not {value}")
        return value

    @field_validator("url_allow_test_hosts")
    @classmethod
    def _test_hosts(cls, value: dict[str, str]) -> dict[str, str]:
        try:
            parse_test_hosts(value)
        except ValueError:
            raise ValueError(f'url_allow_test_hosts maps host names to "ip:port", not {value}') from None
        return value

    @field_validator("alpha_background")
    @classmethod
    def _colour(cls, value: str) -> str:
        from PIL import ImageColor

        ImageColor.getrgb(value)  # ValueError: a clear message at start, not at the first upload
        return value

    @property
    def sqlalchemy_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'cbir.sqlite3'}"

    @property
    def import_root_paths(self) -> list[Path]:
        return list(self.import_root_map.values())

    @property
    def import_root_map(self) -> dict[str, Path]:
        """CBIR_IMPORT_ROOTS by name: "photos=/srv/photos:/mnt/scans" -> photos, scans."""
        return dict(parse_import_roots(self.import_roots))

    @property
    def decode_budget_bytes(self) -> int:
        """CBIR_DECODE_MEMORY_BUDGET_BYTES, or its default for this machine."""
        return self.decode_memory_budget_bytes or default_budget()

    @property
    def decode_bytes_cap(self) -> int:
        """CBIR_MAX_DECODE_BYTES (768 MiB when 0), never above the budget: new input the budget
        can never hold is refused, not queued forever (a stored file waits for the whole budget)."""
        return min(self.max_decode_bytes or DEFAULT_MAX_DECODE_BYTES, self.decode_budget_bytes)

    @property
    def pending_embeds_limit(self) -> int:
        return self.max_pending_embeds or min(32, max(8, 8 * (os.cpu_count() or 1)))

    @property
    def images_dir(self) -> Path:
        return self.data_dir / "images"

    @property
    def index_dir(self) -> Path:
        return self.data_dir / "indexes"

    @property
    def checkpoints_dir(self) -> Path:
        return self.data_dir / "checkpoints"

    @property
    def onnx_dir(self) -> Path:
        """ONNX exports of CNN embedders, one file per embedder version (CBIR_CNN_RUNTIME)."""
        return self.data_dir / "onnx"

    @property
    def journal_dir(self) -> Path:
        """Each process's journal of image files written ahead of their commit."""
        return self.data_dir / "journal"

    @property
    def uploads_dir(self) -> Path:
        """Archives and manifests of import jobs, kept until the job ends so it can resume."""
        return self.data_dir / "uploads"

    @property
    def tmp_dir(self) -> Path:
        return self.data_dir / "tmp"

    def ensure_dirs(self) -> None:
        for folder in (self.data_dir, self.images_dir, self.index_dir, self.checkpoints_dir, self.tmp_dir):
            folder.mkdir(parents=True, exist_ok=True)


def shown_vector_store(value: str) -> str:
    """CBIR_VECTOR_STORE as it may be shown (repr, JSON, messages): the token's value and any
    user-info hidden, ``milvus://u:p@h:1?token=u:p&db=x`` -> ``milvus://h:1?token=…&db=x``."""
    try:
        parts = urlsplit(value)
        if not parts.scheme or not parts.netloc:
            return re.sub(r"token=[^&\s]*", f"token={MARK}", redact_url(value) if "@" in value else value)
        netloc = parts.netloc.rpartition("@")[2]
        query = re.sub(r"(^|&)token=[^&]*", rf"\1token={MARK}", parts.query)
        shown = f"{parts.scheme}://{netloc}{parts.path}"
        return f"{shown}?{query}" if query else shown
    except ValueError:
        return redact_url(value)


def check_vector_store(value: str) -> str:
    """``faiss`` for an empty value or ``faiss``; a Milvus address as given; ValueError otherwise
    (whose message never holds the token)."""
    text = value.strip()
    if text.lower() in {"", "faiss"}:
        return "faiss"
    shown = shown_vector_store(text)[:80]
    want = "want faiss, milvus://HOST:PORT or http(s)://HOST:PORT, optionally ?token=...&db=..."
    parts = urlsplit(text)
    if parts.scheme not in {"milvus", "http", "https"} or not parts.hostname:
        raise ValueError(f"CBIR_VECTOR_STORE {shown!r} is not a vector store: {want}")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"CBIR_VECTOR_STORE {shown!r} has a bad port: {want}") from None
    if parts.scheme == "milvus" and port is None:
        raise ValueError(f"CBIR_VECTOR_STORE {shown!r} names no port (Milvus listens on 19530)")
    if parts.path not in {"", "/"} or parts.fragment:
        raise ValueError(f"CBIR_VECTOR_STORE {shown!r}: no path or fragment expected: {want}")
    unknown = set(parse_qs(parts.query)) - {"token", "db"}
    if unknown:
        raise ValueError(f"CBIR_VECTOR_STORE takes only token and db options, not {sorted(unknown)}")
    return text


def parse_import_roots(value: str) -> list[tuple[str, Path]]:
    """ "photos=/srv/photos:/mnt/scans" -> [("photos", /srv/photos), ("scans", /mnt/scans)]: an
    unnamed entry is named by its folder's name."""
    roots: list[tuple[str, Path]] = []
    for entry in (e.strip() for e in value.split(os.pathsep)):
        name, named, folder = entry.partition("=")
        if not named or not name.strip() or "/" in name:
            name, folder = "", entry  # a path (which may hold "=")
        if folder.strip():
            path = Path(folder.strip()).expanduser().resolve()
            root = (name.strip() or path.name or "/", path)
            if root not in roots:
                roots.append(root)
    return roots


def check_cors(origins: list[str], *, allow_credentials: bool) -> None:
    """A wildcard origin with credentials would let any site act as the signed-in user."""
    if allow_credentials and "*" in origins:
        raise ValueError('CBIR_CORS_ORIGINS may not contain "*" when CBIR_CORS_ALLOW_CREDENTIALS is on')


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
