"""The demo collection: MNIST's 60,000 training digits, an embedder selected on their labels, indexed."""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import select

from app.catalog.collections import create_collection, get_collection
from app.context import AppContext
from app.data.records import CollectionRecord
from app.ingest.sources.datasets import keep_local_copy
from app.ingest.sources.kinds import DatasetSource, count_members
from app.learning.job_kinds import job_runner
from app.learning.selection import DEMO_FULL_BUDGET_S, format_table, select_and_train

Step = Callable[[str], None]


def ensure_demo(
    ctx: AppContext,
    *,
    name: str,
    epochs: int | None,
    bar: Callable[[str], Callable[[int, int | None], None]],
    train_bars: Callable[[str], Callable[[int, int, int, float], None] | None] | None = None,
    say: Step = print,
) -> None:
    """Build whatever part of the demo is missing; a complete demo costs a few queries.

    ``bar(description)`` returns an ``update(done, total)`` callback (a progress bar);
    ``train_bars(name)`` one for the epochs of a training. ``epochs``: the winner's full training.
    """
    with ctx.db.session() as session:
        exists = session.scalar(select(CollectionRecord.id).where(CollectionRecord.name == name))
    if not exists:
        create_collection(ctx, name=name, embedder="cdae")
        say(f"created collection {name!r} (embedder cdae)")
    info = get_collection(ctx, name)
    source = DatasetSource("mnist", "train")
    keep_local_copy(datasets_dir=ctx.settings.datasets_dir, download_dir=ctx.settings.data_dir / "datasets")
    expected = count_members(source, datasets_dir=ctx.settings.datasets_dir, data_dir=ctx.settings.data_dir)
    if expected is None or info.image_count < expected:
        runner = job_runner(ctx)
        job_id = runner.create_job(collection=name, source=source)
        update = bar("import MNIST train")
        runner.run_import(
            job_id=job_id,
            collection=name,
            source=source,
            on_progress=lambda counts, total: update(counts["done"], total),
        )
        info = get_collection(ctx, name)
        say(f"stored {info.image_count} images")
    if info.checkpoint is None:
        # MNIST train has labels: the embedder is chosen on a held-out part of them (docs/selection.md).
        outcome = select_and_train(
            ctx,
            collection=name,
            epochs=epochs,
            full_budget_s=DEMO_FULL_BUDGET_S,
            load_progress=bar("read images"),
            train_bars=train_bars,
            embed_progress=bar("embed + index"),
            say=say,
        )
        say(format_table(outcome.selection.summary()))
        info = get_collection(ctx, name)
    say(
        f"collection {name!r}: {info.image_count} images, {info.index_size} indexed, "
        f"embedder {info.embedder_version}"
    )
