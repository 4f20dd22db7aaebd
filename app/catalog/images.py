"""Stored images: look up, serve the file or a thumbnail, delete (row, file and vector together)."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from sqlalchemy import select

from app.catalog.collections import _delete_unreferenced_files
from app.context import AppContext
from app.core.errors import ImageNotFound
from app.core.faults import crash_point
from app.data.records import CollectionRecord, EmbeddingRecord, ImageRecord
from app.data.storage import EXTENSIONS, MEDIA_TYPES, storage_fault, write_atomic
from app.imaging.decoding import reserved_for_thumbnail

THUMBNAIL_SIZES = (64, 128, 256)


@dataclass(frozen=True)
class StoredImage:
    record: ImageRecord
    collection: str


def get_image(ctx: AppContext, image_id: int) -> StoredImage:
    with ctx.db.session() as session:
        row = session.execute(
            select(ImageRecord, CollectionRecord.name)
            .join(CollectionRecord, CollectionRecord.id == ImageRecord.collection_id)
            .where(ImageRecord.id == image_id)
        ).first()
    if row is None:
        raise ImageNotFound(f"there is no image with id {image_id}")
    return StoredImage(record=row[0], collection=row[1])


def stored_embedding(ctx: AppContext, image_id: int) -> np.ndarray | None:
    """The (dim,) float32, L2-normalised vector the collection serves for the image; None before
    the image is embedded (an untrained embedder)."""
    with ctx.db.session() as session:
        blob = session.scalar(
            select(EmbeddingRecord.vector)
            .join(ImageRecord, ImageRecord.id == EmbeddingRecord.image_id)
            .join(CollectionRecord, CollectionRecord.id == ImageRecord.collection_id)
            .where(EmbeddingRecord.image_id == image_id)
            .where(EmbeddingRecord.embedder_version == CollectionRecord.embedder_version)
        )
    return None if blob is None else np.frombuffer(blob, dtype="<f4").astype(np.float32)


def image_file(ctx: AppContext, image_id: int) -> tuple[Path, str]:
    """Path and true media type of the stored file."""
    record = get_image(ctx, image_id).record
    path = ctx.store.path_for(record.sha256, record.format)
    if not path.exists():
        raise ImageNotFound(f"the file of image {image_id} is missing from the store")
    return path, MEDIA_TYPES[record.format]


def thumbnail(ctx: AppContext, image_id: int, *, size: int) -> tuple[Path, str]:
    """A cached thumbnail no larger than ``size`` (the original when it is already small)."""
    size = min(THUMBNAIL_SIZES, key=lambda s: abs(s - size))
    record = get_image(ctx, image_id).record
    if record.width <= size and record.height <= size:
        return image_file(ctx, image_id)
    path = ctx.settings.data_dir / "thumbs" / str(size) / record.sha256[:2] / f"{record.sha256}.webp"
    if not path.exists() and ctx.store.gate.closed:
        return image_file(ctx, image_id)  # read-only: no cache to write, the browser scales the original
    if not path.exists():
        source, _ = image_file(ctx, image_id)
        data = source.read_bytes()
        # Within the decode memory budget (503 overloaded when it stays full); a stored file is
        # never refused for its bytes, whatever CBIR_MAX_DECODE_BYTES is now.
        with reserved_for_thumbnail(ctx, data, side=size), Image.open(io.BytesIO(data)) as opened:
            opened.draft("RGB", (size, size))
            image: Image.Image = opened.convert("RGB") if opened.mode not in ("RGB", "L") else opened
            image.thumbnail((size, size))
            out = io.BytesIO()
            image.save(out, format="WEBP", quality=80)
        try:
            write_atomic(path, out.getvalue(), fsync=False)  # a cache: rebuilt if lost
        except OSError as exc:
            if storage_fault(exc) is None:
                raise
            return image_file(ctx, image_id)  # a full or read-only disk: serve the original
    return path, "image/webp"


def delete_image(ctx: AppContext, image_id: int) -> None:
    ctx.store.gate.check()  # read-only: 503 before anything is touched
    file_key: tuple[str, str] | None = None
    with ctx.write_lock:
        try:
            with ctx.db.transaction() as session:
                record = session.get(ImageRecord, image_id)
                if record is None:
                    raise ImageNotFound(f"there is no image with id {image_id}")
                collection = session.get(CollectionRecord, record.collection_id)
                file_key = (record.sha256, record.format)
                # Journalled before the commit: should this process die before the file is gone,
                # the next start removes it (no row refers to it); the index is checked then too.
                ctx.store.journal.note([file_key])
                session.delete(record)  # embeddings go with it (ON DELETE CASCADE)
            crash_point("after_db_tombstone_before_remove_ids")
            assert collection is not None
            ctx.indexes.remove(collection, np.asarray([image_id], dtype=np.int64))
        finally:
            if file_key is not None:  # kept if the delete did not commit: a row still refers to it
                _delete_unreferenced_files(ctx, [file_key])
                ctx.store.journal.settle([file_key])


__all__ = ["EXTENSIONS", "StoredImage", "delete_image", "get_image", "image_file", "thumbnail"]
