"""Loads each collection's embedder once and keeps it: models are expensive, collections share them.

A pretrained CNN's runtime (``CBIR_CNN_RUNTIME``: the ONNX export and, for ``auto``, the timing of
torch against ONNX Runtime) is chosen in a background thread started the first time the service
loads that embedder (the first search, upload or import that needs it), never inside the request:
that request and any other before the choice is made compute their codes in torch (same vectors
within float tolerance, same version). The export and the choice are cached in ``CBIR_DATA_DIR/onnx``,
so a later start only reads them.
"""

from __future__ import annotations

import hashlib
import logging
import threading

import torch

from app.core.errors import (
    EmbedderNotReady,
    IndexMismatch,
    InvalidEmbedderOptions,
    UnknownEmbedderName,
    WeightsMissing,
)
from app.core.settings import Settings
from app.data.records import CheckpointRecord, CollectionRecord
from app.embedding.whitened import WhitenedEmbedder
from models import registry
from models.base import Embedder

log = logging.getLogger(__name__)


def validate_embedder_name(name: str) -> str:
    """A spec string (``name[:key=value,...]``) checked and in its canonical spelling."""
    try:
        return registry.canonical(name)
    except registry.UnknownEmbedder as exc:
        raise UnknownEmbedderName(str(exc.args[0])) from None
    except registry.InvalidEmbedderOptions as exc:
        raise InvalidEmbedderOptions(str(exc)) from None


class EmbedderCache:
    """Embedders keyed by (name, checkpoint SHA-256); created under a lock, loaded lazily."""

    def __init__(self, *, settings: Settings, device: torch.device) -> None:
        self.settings = settings
        self.device = device
        self._lock = threading.Lock()
        self._cache: dict[tuple[str, str], Embedder] = {}
        self._choosing: dict[int, threading.Thread] = {}  # by id(embedder): one choice each
        self._choosing_lock = threading.Lock()

    def for_collection(self, collection: CollectionRecord, checkpoint: CheckpointRecord | None) -> Embedder:
        """The embedder that produced the collection's served vectors (EmbedderNotReady if untrained)."""
        spec = registry.get_spec(collection.embedder)
        if spec.trainable and checkpoint is None:
            raise EmbedderNotReady(
                f"collection {collection.name!r} uses the trainable embedder {collection.embedder!r} "
                f"and has no trained checkpoint yet; run `cbir train {collection.embedder} "
                f"--collection {collection.name}`"
            )
        embedder = self.get(collection.embedder, checkpoint)
        if collection.embedder_version is not None and embedder.version != collection.embedder_version:
            # the weights or preprocessing changed under the stored vectors: searching them with the
            # new codes would be silently wrong
            raise IndexMismatch(
                f"collection {collection.name!r} stores {collection.embedder_version} vectors but "
                f"{collection.embedder!r} now gives {embedder.version} (its weights file changed?); "
                "restore the weights or re-create the collection"
            )
        return embedder

    def get(self, name: str, checkpoint: CheckpointRecord | None = None) -> Embedder:
        path = self.settings.data_dir / checkpoint.path if checkpoint is not None else None
        # Keyed by content, not path: a checkpoint is identified by its SHA-256.
        key = (name, checkpoint.sha256 if checkpoint is not None else "")
        with self._lock:
            embedder = self._cache.get(key)
            if embedder is None and checkpoint is not None:
                self._verify(checkpoint)
            if (
                embedder is None
                and checkpoint is not None
                and (checkpoint.config or {}).get("kind") == "whitening"
            ):
                embedder = self._whitened(name, checkpoint)
            elif embedder is None and checkpoint is not None and (checkpoint.config or {}).get("base"):
                embedder = self._on_base(name, checkpoint)
            if embedder is None:
                try:
                    embedder = registry.create(
                        name,
                        checkpoint=path,
                        device=self.device,
                        weights_dir=self.settings.weights_dir,
                        download=self.settings.weights_download,
                        runtime=self.settings.cnn_runtime,
                        onnx_dir=self.settings.onnx_dir,
                        defer_runtime=True,
                    )
                except registry.InvalidEmbedderOptions as exc:
                    raise InvalidEmbedderOptions(str(exc)) from None
                except (OSError, ValueError) as exc:  # a checkpoint file missing or torn
                    raise IndexMismatch(
                        f"checkpoint file {checkpoint.path if checkpoint else '?'} cannot be used: {exc}; "
                        "restore it or retrain"
                    ) from None
            if checkpoint is not None and embedder.version != checkpoint.version:
                raise IndexMismatch(
                    f"checkpoint file {checkpoint.path} no longer matches the database "
                    f"(expected {checkpoint.version}, found {embedder.version}); restore it or retrain"
                )
            self._cache[key] = embedder
        try:
            embedder.load()
        except registry.WeightsMissing as exc:
            with self._lock:  # a file put in place later is found without a restart
                self._cache.pop(key, None)
            raise WeightsMissing(str(exc)) from None
        self._choose_runtime(embedder)
        return embedder

    def _choose_runtime(self, embedder: Embedder) -> None:
        """Start the embedder's runtime choice in the background, once (torch serves meanwhile)."""
        if not embedder.runtime_pending:
            return
        with self._choosing_lock:
            if id(embedder) in self._choosing:
                return
            # not a daemon: a process exiting in the middle of an export waits for it (seconds) rather
            # than aborting inside torch or ONNX Runtime
            thread = threading.Thread(target=self._prepare, args=(embedder,), name="cbir-runtime-choice")
            self._choosing[id(embedder)] = thread
        thread.start()

    @staticmethod
    def _prepare(embedder: Embedder) -> None:
        try:
            embedder.prepare_runtime()
        except Exception:  # torch keeps serving; the next start tries again
            log.exception("choosing the runtime of %s failed; it stays in torch", embedder.name)

    def wait_for_runtimes(self, timeout: float | None = None) -> bool:
        """Wait for the runtime choices started so far (tests, benchmarks); True when all are made."""
        with self._choosing_lock:
            threads = list(self._choosing.values())
        for thread in threads:
            thread.join(timeout)
        return not any(thread.is_alive() for thread in threads)

    def runtimes(self) -> list[dict[str, object]]:
        """The runtime of every loaded embedder that chooses one: spec, version and runtime_info()."""
        with self._lock:
            loaded = list(self._cache.items())
        out = []
        for (name, _), embedder in loaded:
            info = embedder.runtime_info()
            if info is not None:
                out.append({"embedder": name, "version": embedder.version, **info})
        return sorted(out, key=lambda row: (str(row["embedder"]), str(row["version"])))

    def runtime_of(self, name: str) -> dict[str, object] | None:
        """runtime_info() of the pretrained embedder ``name`` if it is loaded (never loads it): what a
        collection of that embedder, whitened or not, computes its codes with."""
        with self._lock:
            embedder = self._cache.get((name, ""))
        return embedder.runtime_info() if embedder is not None else None

    def _verify(self, checkpoint: CheckpointRecord) -> None:
        """The checkpoint's file (on the data folder every replica shares) has the SHA-256 recorded
        with it; IndexMismatch naming its relative path otherwise (never the server's path)."""
        digest = hashlib.sha256()
        try:
            with open(self.settings.data_dir / checkpoint.path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
        except OSError as exc:
            raise IndexMismatch(
                f"checkpoint file {checkpoint.path} of checkpoint {checkpoint.id} cannot be read "
                f"({type(exc).__name__}); restore it or retrain"
            ) from None
        found = digest.hexdigest()
        if found != checkpoint.sha256:
            raise IndexMismatch(
                f"checkpoint file {checkpoint.path} does not match the SHA-256 recorded with checkpoint "
                f"{checkpoint.id} (expected {checkpoint.sha256[:12]}…, found {found[:12]}…): it was "
                "damaged or replaced; restore it or retrain"
            )

    def _pretrained(self, name: str) -> Embedder:
        """The pretrained embedder ``name``, cached and loaded (called under the lock)."""
        key = (name, "")
        base = self._cache.get(key)
        if base is None:
            base = registry.create(
                name,
                device=self.device,
                weights_dir=self.settings.weights_dir,
                download=self.settings.weights_download,
                runtime=self.settings.cnn_runtime,
                onnx_dir=self.settings.onnx_dir,
                defer_runtime=True,
            )
            self._cache[key] = base
        try:
            base.load()
        except registry.WeightsMissing as exc:
            self._cache.pop(key, None)
            raise WeightsMissing(str(exc)) from None
        self._choose_runtime(base)
        return base

    def _whitened(self, name: str, checkpoint: CheckpointRecord) -> Embedder:
        """A pretrained embedder followed by the collection's PCA-whitening (called under the lock)."""
        base = self._pretrained(name)
        try:
            return WhitenedEmbedder(base=base, path=self.settings.data_dir / checkpoint.path)
        except (OSError, ValueError) as exc:
            raise IndexMismatch(f"whitening of checkpoint {checkpoint.id} cannot be used: {exc}") from None

    def _on_base(self, name: str, checkpoint: CheckpointRecord) -> Embedder:
        """A trained embedder over a frozen pretrained one (``cnn_head``): the base is built with this
        service's weights settings, then handed to the trained embedder's factory (under the lock)."""
        base = self._pretrained(str(checkpoint.config["base"]))
        try:
            embedder = registry.get_spec(name).factory(
                checkpoint=self.settings.data_dir / checkpoint.path, device=self.device, base=base
            )
        except (OSError, ValueError) as exc:
            raise IndexMismatch(
                f"checkpoint {checkpoint.id} ({checkpoint.path}) cannot be used: {exc}"
            ) from None
        if embedder.version != checkpoint.version:
            raise IndexMismatch(
                f"checkpoint file {checkpoint.path} no longer matches the database "
                f"(expected {checkpoint.version}, found {embedder.version}); restore it or retrain"
            )
        self._cache[(name, checkpoint.sha256)] = embedder
        return embedder

    def clear(self) -> None:
        with self._lock:
            self._cache.clear()


def embedder_choices() -> list[registry.EmbedderSpec]:
    """Every registered embedder, by name (what a new collection can use)."""
    return [registry.get_spec(name) for name in registry.names()]
