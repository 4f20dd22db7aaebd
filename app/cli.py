"""The ``cbir`` command line: serve, build the demo, import, train, evaluate."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
from pydantic import ValidationError
from tqdm import tqdm

from app.context import AppContext, open_context
from app.errors import CbirError
from app.settings import Settings, get_settings


def _bar(description: str) -> Callable[[int, int | None], None]:
    """A progress bar as an ``update(done, total)`` callback; it appears on the first update."""
    state: dict[str, Any] = {}

    def update(done: int, total: int | None) -> None:
        if "bar" not in state:
            state["bar"] = tqdm(total=total, desc=description, dynamic_ncols=True, file=sys.stderr)
        progress = state["bar"]
        progress.update(done - progress.n)
        if total is not None and done >= total:
            progress.close()

    return update


def _epoch_bars(name: str = "") -> Callable[[int, int, int, float], None]:
    """Training progress: one bar per epoch, with the running loss (``name``: what trains)."""
    bars: dict[int, tqdm] = {}
    prefix = f"{name} " if name else ""

    def on_step(epoch: int, step: int, steps: int, loss: float) -> None:
        if epoch not in bars:
            bars[epoch] = tqdm(
                total=steps, desc=f"{prefix}epoch {epoch}", dynamic_ncols=True, file=sys.stderr
            )
        bar = bars[epoch]
        bar.update(step - bar.n)
        bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        if step >= steps:
            bar.close()

    return on_step


@contextmanager
def _context(*, threads: int | None = None) -> Iterator[AppContext]:
    """A service context for one command; domain errors become a clean exit message."""
    try:
        context = open_context(get_settings(), torch_threads=threads)
    except ValidationError as exc:
        raise click.ClickException(f"invalid CBIR_* setting: {exc}") from None
    except CbirError as exc:  # e.g. CBIR_DEFAULT_EMBEDDER names no embedder
        raise click.ClickException(exc.detail) from None
    try:
        yield context
    except CbirError as exc:
        raise click.ClickException(exc.detail) from None
    finally:
        context.close()


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="log at INFO level")
def main(verbose: bool) -> None:
    """cbir: content-based image retrieval. Settings come from CBIR_* environment variables."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


@main.command()
@click.option("--host", default=None, help="default: CBIR_HOST (127.0.0.1)")
@click.option("--port", type=int, default=None, help="default: CBIR_PORT (8000); 0: any free port, logged")
def serve(host: str | None, port: int | None) -> None:
    """Run the HTTP service (REST API under /api/v1, web page at /)."""
    import uvicorn

    from app.main import create_app

    settings: Settings = get_settings()
    if host:  # the address decides whether keyless writes are refused (app/api/exposure.py)
        settings = settings.model_copy(update={"host": host})
    if settings.create_admin_key:
        _first_admin_key(settings)
    # uvicorn shuts down gracefully on SIGTERM, then raises the signal again under the handler that
    # was there before it: with this one the process ends with status 0, not "killed by SIGTERM".
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port if port is None else port,
        log_level="info",
        timeout_graceful_shutdown=10,
    )


def _first_admin_key(settings: Settings) -> None:
    """CBIR_CREATE_ADMIN_KEY: on a first start without any key, create the admin key "admin" and
    print it, on one line (a container's log keeps it); only its SHA-256 is stored."""
    from app.services.keys import create_first_key

    with _database() as db:
        secret = create_first_key(db, config_keys=settings.api_keys.get_secret_value())
    if secret is not None:
        click.echo(
            "cbir: no API key existed, so the admin key 'admin' was created (CBIR_CREATE_ADMIN_KEY); "
            f"it is shown only now, keep it: {secret}"
        )


@main.command()
@click.option("--name", default=None, help="default: CBIR_DEMO_COLLECTION (mnist)")
@click.option(
    "--epochs",
    type=int,
    default=None,
    help="the selected embedder's epochs (default: CBIR_DEMO_EPOCHS or its recipe's)",
)
def demo(name: str | None, epochs: int | None) -> None:
    """Build the demo collection when it is missing: MNIST train, an embedder selected on its labels
    (pixels, PCA, CDAEs, LeNet-5; docs/selection.md), indexed."""
    from app.services.demo import ensure_demo

    settings = get_settings()
    with _context(threads=os.cpu_count()) as ctx:
        ensure_demo(
            ctx,
            name=name or settings.demo_collection,
            epochs=epochs or settings.demo_epochs or None,
            bar=_bar,
            train_bars=_epoch_bars,
            say=lambda text: click.echo(text, err=True),
        )


@main.group()
def collections() -> None:
    """List and create collections."""


@collections.command("list")
def collections_list() -> None:
    from app.services.collections import list_collections

    with _context() as ctx:
        for info in list_collections(ctx):
            click.echo(
                f"{info.name}\t{info.embedder}\t{info.embedder_version or 'untrained'}\t"
                f"{info.image_count} images\t{info.index_size} indexed"
            )


@collections.command("create")
@click.argument("name")
@click.option("--embedder", default=None, help="default: CBIR_DEFAULT_EMBEDDER")
def collections_create(name: str, embedder: str | None) -> None:
    from app.services.collections import create_collection

    with _context() as ctx:
        info = create_collection(ctx, name=name, embedder=embedder or ctx.settings.default_embedder)
        click.echo(f"created {info.name} ({info.embedder})")


@collections.command("search-options")
@click.argument("name")
@click.option("--qe", type=int, required=True, help="alpha-query-expansion depth (0: off)")
@click.option("--qe-alpha", type=float, default=3.0, show_default=True)
def collections_search_options(name: str, qe: int, qe_alpha: float) -> None:
    """Set the query-side re-ranking every search of the collection uses."""
    from app.services.tuning import set_search_options

    with _context() as ctx:
        options = set_search_options(ctx, collection=name, qe=qe, qe_alpha=qe_alpha)
        click.echo(f"{name}: qe={options.qe} qe_alpha={options.qe_alpha:g}")


@collections.command("tune")
@click.argument("name")
@click.option("--auto", type=click.Choice(["on", "off"]), default=None, help="switch automatic tuning")
@click.option("--now", is_flag=True, help="measure and serve the steps that help now")
@click.option(
    "--groundtruth",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="with --now: validate on this Holidays-style JSON instead of the images' labels",
)
def collections_tune(name: str, auto: str | None, now: bool, groundtruth: Path | None) -> None:
    """Show the automatic tuning (whitening, query expansion) of a pretrained-CNN collection: its
    switch, the steps served and the validation table, as JSON; --auto and --now change it."""
    from app.services import autotune
    from app.services import groundtruth as gt
    from app.services.collections import get_collection

    if groundtruth is not None and not now:
        raise click.UsageError("--groundtruth goes with --now")
    with _context(threads=os.cpu_count()) as ctx:
        if auto is not None:
            autotune.set_autotune(ctx, collection=name, on=auto == "on")
        if now:
            truth = gt.read_groundtruth(groundtruth) if groundtruth is not None else None
            autotune.tune_collection(ctx, collection=name, groundtruth=truth)
        click.echo(json.dumps(get_collection(ctx, name).tuning, indent=1))


@collections.command("reembed")
@click.argument("name")
@click.option("--embedder", "spec", required=True, help="a pretrained embedder spec: efficientnet_lite0 ...")
def collections_reembed(name: str, spec: str) -> None:
    """Switch a collection to another pretrained embedder: every image re-embedded, then served.
    Searches (of a server on the same data) use the old vectors until the new ones are complete;
    if this command is interrupted, the server resumes the job on its next start."""
    from app.services import jobs
    from app.services.reembed import check_reembed

    with _context(threads=os.cpu_count()) as ctx:
        spec, model = check_reembed(ctx, collection=name, embedder=spec)
        runner = jobs.JobRunner(ctx)
        job_id = runner.create_reembed_job(collection=name, spec=spec)
        runner.run_reembed(job_id=job_id, collection=name, spec=spec)
        info = jobs.get_job(ctx, job_id)
        r = info.record
        click.echo(
            f"job {job_id}: {r.state}; {r.done} images embedded with {model.version}"
            + (f"; {r.error}" if r.error else "")
        )
        if r.state != "succeeded":
            raise SystemExit(1)


@collections.command("whiten")
@click.argument("name")
@click.option("--dim", type=int, required=True, help="components kept (16 to 512 is typical)")
@click.option("--shrinkage", type=float, default=0.5, show_default=True, help="0: plain PCA-whitening")
def collections_whiten(name: str, dim: int, shrinkage: float) -> None:
    """Fit a PCA-whitening on the collection's codes and serve the whitened codes."""
    from app.services.tuning import whiten_collection

    with _context(threads=os.cpu_count()) as ctx:
        saved = whiten_collection(ctx, collection=name, dim=dim, shrinkage=shrinkage, progress=_bar("embed"))
        click.echo(f"{name}: serving {saved.version} (checkpoint {saved.id})")


@main.command("import")
@click.argument("source")
@click.option("--collection", required=True)
@click.option(
    "--layout",
    type=click.Choice(["auto", "images", "idx", "holidays"]),
    default="auto",
    show_default=True,
    help="for a folder: subfolder labels, MNIST-format IDX files, or groundtruth.json beside the images",
)
@click.option(
    "--manifest",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    default=None,
    help="with an archive: a CSV or JSON-lines file naming its members and their metadata",
)
@click.option(
    "--urls",
    is_flag=True,
    help="SOURCE is a text file of image URLs, one a line (fetched from public hosts only)",
)
def import_(source: str, collection: str, layout: str, manifest: Path | None, urls: bool) -> None:
    """Import SOURCE into a collection through the same pipeline as the API: a folder, a zip/tar
    archive, a manifest (.csv or .jsonl: path, label, metadata columns), DATASET:SPLIT (mnist:all),
    or with --urls a file of image URLs.

    The job is recorded like the API's: if this command is killed, the server (or the next
    `cbir serve`) resumes it."""
    import shutil
    import tempfile

    from app.services import jobs
    from app.services.collections import get_collection

    with _context(threads=os.cpu_count()) as ctx:
        get_collection(ctx, collection)  # fail before copying anything
        path = Path(source)
        if urls:
            from app.services.url_source import check_urls, read_url_list

            parsed: jobs.Source = check_urls(read_url_list(path), settings=ctx.settings)
        elif path.is_dir():
            parsed = jobs.check_folder(path, layout=layout)
        elif path.is_file() and path.suffix.lower() in (".csv", ".jsonl"):
            parsed = jobs.check_manifest(path)
        elif path.is_file():
            jobs.check_archive(path, path.name)

            # The job deletes its uploads when done: hand it copies in the data folder.
            def keep_copy(original: Path, suffix: str) -> Path:
                ctx.settings.tmp_dir.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=ctx.settings.tmp_dir, prefix="import-")
                os.close(fd)
                shutil.copyfile(original, tmp)
                return jobs.keep_upload(ctx, Path(tmp), suffix=suffix)

            kept = keep_copy(path, ".archive")
            copy = keep_copy(manifest, ".manifest") if manifest is not None else None
            parsed = jobs.check_archive(kept, path.name, manifest=copy)
        else:
            dataset, _, split = source.partition(":")
            parsed = jobs.check_dataset(dataset, split or "train")
        runner = jobs.JobRunner(ctx)
        job_id = runner.create_job(collection=collection, source=parsed, creator="admin")  # the operator
        update = _bar(f"import {source}")
        runner.run_import(
            job_id=job_id,
            collection=collection,
            source=parsed,
            on_progress=lambda c, total: update(c["done"], total),
        )
        info = jobs.get_job(ctx, job_id)
        r = info.record
        click.echo(
            f"job {job_id}: {r.state}; {r.added} added, {r.duplicates} duplicates, {r.failed} failed"
            f" ({info.images_per_second or 0:.0f} images/s; report: {jobs.report_path(ctx, job_id)})"
            + (f"; {r.error}" if r.error else "")
        )
        if r.state != "succeeded":
            raise SystemExit(1)


@contextmanager
def _database() -> Iterator[Any]:
    """Just the database (migrated to head): what the key commands need, without any model."""
    from app.db import Database

    try:
        settings = get_settings()
    except ValidationError as exc:
        raise click.ClickException(f"invalid CBIR_* setting: {exc}") from None
    settings.ensure_dirs()
    db = Database(settings.sqlalchemy_url)
    try:
        db.migrate()
        yield db
    except CbirError as exc:
        raise click.ClickException(exc.detail) from None
    finally:
        db.dispose()


@main.group()
def keys() -> None:
    """API keys: scopes read < write < admin. With CBIR_AUTH=auto (the default) the service
    requires keys as soon as the first one is created."""


@keys.command("create")
@click.argument("name")
@click.option("--scope", type=click.Choice(["read", "write", "admin"]), required=True)
def keys_create(name: str, scope: str) -> None:
    """Create a key and print it, once: only its SHA-256 is stored."""
    from app.services.keys import Scope, create_key

    with _database() as db:
        info, secret = create_key(db, name=name, scope=Scope[scope])
    click.echo(f"created {info.scope.name} key {info.name!r}; it is shown only now:", err=True)
    click.echo(secret)


@keys.command("list")
def keys_list() -> None:
    """The keys with their scope and visible prefix (never the secret)."""
    from app.services.keys import list_keys, parse_config_keys

    with _database() as db:
        configured = [info for info, _ in parse_config_keys(get_settings().api_keys.get_secret_value())]
        stored = list_keys(db)
    for info in [*configured, *stored]:
        state = f"revoked {info.revoked_at:%Y-%m-%d %H:%M}" if info.revoked_at else "active"
        created = f"{info.created_at:%Y-%m-%d %H:%M}" if info.created_at else "CBIR_API_KEYS"
        click.echo(f"{info.name}\t{info.scope.name}\t{info.prefix}\t{created}\t{state}")


@keys.command("revoke")
@click.argument("name")
def keys_revoke(name: str) -> None:
    """Revoke a key; running servers refuse it within seconds."""
    from app.services.keys import revoke_key

    with _database() as db:
        info = revoke_key(db, name)
    click.echo(f"revoked {info.name!r}")


@main.group()
def bench() -> None:
    """Measure throughput on this machine."""


@bench.command("embed")
@click.option(
    "--embedder", "spec", required=True, help="a spec string: resnet50, efficientnet_lite0:flip=1 ..."
)
@click.option(
    "--batch", type=click.IntRange(min=1), default=8, show_default=True, help="images per forward pass"
)
@click.option(
    "--folder",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="images for the real path (default: CBIR_DATASETS_DIR/inria-holidays-dev/jpg)",
)
@click.option(
    "--seconds", type=click.FloatRange(min=0, min_open=True), default=10.0, show_default=True, help="per path"
)
@click.option(
    "--threads", type=click.IntRange(min=1), default=None, help="torch threads (CBIR_TORCH_THREADS)"
)
@click.option("--json", "as_json", is_flag=True, help="print one JSON object as the last line")
def bench_embed_command(
    spec: str, batch: int, folder: Path | None, seconds: float, threads: int | None, as_json: bool
) -> None:
    """Images/s of the raw forward pass and of decode + preprocess + forward, on the current device."""
    import torch

    from app.services import bench as service
    from models.device import pick_device

    try:
        settings = get_settings()
        device = pick_device(settings.device)
    except ValidationError as exc:
        raise click.ClickException(f"invalid CBIR_* setting: {exc}") from None
    except ValueError as exc:
        raise click.ClickException(f"CBIR_DEVICE: {exc}") from None
    torch.set_num_threads(threads or settings.torch_threads)
    try:
        result = service.bench_embed(
            spec=spec,
            settings=settings,
            device=device,
            batch=batch,
            folder=folder or service.default_folder(settings),
            seconds=seconds,
            say=lambda text: click.echo(text, err=True),
        )
    except CbirError as exc:
        raise click.ClickException(exc.detail) from None
    for line in service.format_table(result):
        click.echo(line)
    if as_json:
        click.echo(json.dumps(result.summary()))


@bench.command("index")
@click.option("--n", "n", type=click.IntRange(min=1000), default=100_000, show_default=True, help="vectors")
@click.option("--dim", type=click.IntRange(min=4, max=4096), default=128, show_default=True)
@click.option(
    "--codes",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    default=None,
    help="real codes (rows, dim) as .npy to tile (default: CDAE codes of MNIST, cached)",
)
@click.option(
    "--factory", "factories", multiple=True, help="a FAISS factory string (repeatable; default: all kinds)"
)
@click.option("--queries", type=click.IntRange(min=10), default=1000, show_default=True)
@click.option(
    "--threads", type=click.IntRange(min=1), default=None, help="FAISS threads (default: all cores)"
)
@click.option(
    "--seconds",
    type=click.FloatRange(min=0, min_open=True),
    default=2.0,
    show_default=True,
    help="per QPS figure",
)
@click.option("--json", "as_json", is_flag=True, help="print one JSON object as the last line")
def bench_index_command(
    n: int,
    dim: int,
    codes: Path | None,
    factories: tuple[str, ...],
    queries: int,
    threads: int | None,
    seconds: float,
    as_json: bool,
) -> None:
    """Build time, bytes per vector, QPS and recall@10 of each index kind on tiled real codes."""
    from app.services import bench_index as service

    try:
        settings = get_settings()
    except ValidationError as exc:
        raise click.ClickException(f"invalid CBIR_* setting: {exc}") from None
    settings.ensure_dirs()
    try:
        result = service.bench_index(
            settings,
            n=n,
            dim=dim,
            codes_file=codes,
            factories=list(factories) or None,
            queries=queries,
            threads=threads,
            seconds=seconds,
            say=lambda text: click.echo(text, err=True),
        )
    except CbirError as exc:
        raise click.ClickException(exc.detail) from None
    click.echo(service.table(result))
    if as_json:
        click.echo(json.dumps(result.summary()))


@bench.command("import")
@click.option(
    "--workload",
    "workloads",
    type=click.Choice(["mnist", "holidays"]),
    multiple=True,
    help="repeat for several (default: both)",
)
@click.option(
    "--images", type=click.IntRange(min=1), default=10_000, show_default=True, help="MNIST digits imported"
)
@click.option("--json", "as_json", is_flag=True, help="print one JSON object as the last line")
def bench_import_command(workloads: tuple[str, ...], images: int, as_json: bool) -> None:
    """End-to-end import images/s against each stage alone (read, decode, embed, write), in one run."""
    from app.services import bench_import as service

    try:
        settings = get_settings()
        results = service.run_bench(
            settings,
            workloads=workloads or service.WORKLOADS,
            images=images,
            say=lambda text: click.echo(text, err=True),
        )
    except ValidationError as exc:
        raise click.ClickException(f"invalid CBIR_* setting: {exc}") from None
    except CbirError as exc:
        raise click.ClickException(exc.detail) from None
    click.echo(service.format_table(results))
    if as_json:
        click.echo(json.dumps({"workloads": [r.as_json() for r in results]}))


@bench.command("quality")
@click.option("--set", "sets", multiple=True, help="a data set of the suite (repeatable; default: all)")
@click.option("--method", "methods", multiple=True, help="pixels, pca, cdae-tutorial, cdae-default, selected")
@click.option(
    "--db", type=click.IntRange(min=100), default=10_000, show_default=True, help="MNIST sets: images stored"
)
@click.option(
    "--queries", type=click.IntRange(min=10), default=2_000, show_default=True, help="MNIST sets: queries"
)
@click.option(
    "--epochs", type=click.IntRange(min=1), default=None, help="CDAE epochs (default: the preset's schedule)"
)
@click.option(
    "--cdae-set", "changes", multiple=True, metavar="KEY=VALUE", help="change the default CDAE (an ablation)"
)
@click.option("--json", "as_json", is_flag=True, help="print one JSON object as the last line")
def bench_quality_command(
    sets: tuple[str, ...],
    methods: tuple[str, ...],
    db: int,
    queries: int,
    epochs: int | None,
    changes: tuple[str, ...],
    as_json: bool,
) -> None:
    """The generalisation suite: P@10 and mAP@all per data set for every method."""
    from app.services import bench_quality as service
    from models.device import pick_device

    overrides: dict[str, Any] = {}
    for change in changes:
        key, _, raw = change.partition("=")
        try:
            overrides[key] = json.loads(raw)
        except json.JSONDecodeError:
            overrides[key] = raw
    try:
        settings = get_settings()
        rows = service.run_suite(
            datasets_dir=settings.datasets_dir or Path("../shared/datasets"),
            sets=sets or service.SET_NAMES,
            methods=methods or service.METHODS,
            db=db,
            queries=queries,
            device=pick_device(settings.device),
            epochs=epochs,
            overrides=overrides,
            say=lambda text: click.echo(text, err=True),
        )
    except ValidationError as exc:
        raise click.ClickException(f"invalid CBIR_* setting: {exc}") from None
    except (CbirError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    for line in service.format_table(rows):
        click.echo(line)
    if as_json:
        click.echo(json.dumps(service.summary(rows, db=db, queries=queries)))


def _report_checkpoint(checkpoint: Any, *, label: str, active: bool) -> None:
    losses = checkpoint.metrics.get("epoch_losses", [])
    click.echo(
        f"checkpoint {checkpoint.id}: {checkpoint.version} ({label}, {len(losses)} epochs, "
        f"final loss {losses[-1] if losses else float('nan'):.4f}) -> {checkpoint.path}"
        + (" [active]" if active else "")
    )


@main.group()
def train() -> None:
    """Train a collection's own model."""


@train.command("cdae")
@click.option("--collection", required=True)
@click.option(
    "--epochs", type=int, default=None, help="default: the preset's (with selection: the winner's) count"
)
@click.option(
    "--preset",
    type=click.Choice(["default", "strokes", "tutorial"]),
    default=None,
    help="train this CDAE preset alone (no selection)",
)
@click.option(
    "--select/--no-select",
    default=True,
    show_default=True,
    help="choose among pixels, PCA, CDAEs and LeNet-5 on the collection's held-out labels "
    "(without labels: the default CDAE, not validated); --no-select trains the default CDAE alone",
)
@click.option(
    "--screen-images", type=int, default=None, help="selection: images each candidate is screened on"
)
@click.option(
    "--screen-epochs", type=int, default=None, help="selection: epochs each candidate is screened for"
)
@click.option(
    "--budget",
    type=float,
    default=None,
    help="selection: seconds for the winner's full training (its epochs cut to fit; default: no limit)",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--activate/--no-activate",
    default=True,
    show_default=True,
    help="make it the collection's embedder (re-embed + re-index) or only record the checkpoint",
)
def train_cdae_command(
    collection: str,
    epochs: int | None,
    preset: str | None,
    select: bool,
    screen_images: int | None,
    screen_epochs: int | None,
    budget: float | None,
    seed: int,
    activate: bool,
) -> None:
    """Train the collection's embedder: by default a selection measured on its held-out labels
    (docs/selection.md); the denoising autoencoder alone with --no-select or --preset."""
    from app.services.training import train_cdae

    with _context(threads=os.cpu_count()) as ctx:
        if select and preset is None:
            from app.services import selection

            outcome = selection.select_and_train(
                ctx,
                collection=collection,
                epochs=epochs,
                seed=seed,
                activate=activate,
                screen_images=screen_images or selection.SCREEN_IMAGES,
                screen_epochs=screen_epochs or selection.SCREEN_EPOCHS,
                full_budget_s=budget,
                load_progress=_bar("read images"),
                train_bars=_epoch_bars,
                embed_progress=_bar("embed + index"),
                say=lambda text: click.echo(text, err=True),
            )
            click.echo(selection.format_table(outcome.selection.summary()))
            _report_checkpoint(outcome.checkpoint, label=outcome.selection.winner, active=activate)
            return
        checkpoint = train_cdae(
            ctx,
            collection=collection,
            epochs=epochs,
            preset=preset or "default",
            seed=seed,
            activate=activate,
            load_progress=_bar("read images"),
            train_progress=_epoch_bars(),
            embed_progress=_bar("embed + index"),
        )
        _report_checkpoint(checkpoint, label=preset or "default", active=activate)


def _arch_names() -> list[str]:
    from models.classifier import arch_names

    return arch_names()


@train.command("classifier")
@click.option("--collection", required=True)
@click.option("--arch", type=click.Choice(_arch_names()), default="lenet5", show_default=True)
@click.option("--epochs", type=int, default=None, help="default: the arch's recommended count")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--dim", type=int, default=None, help="--arch head: the code's dimensions (default 128)")
@click.option(
    "--activate/--no-activate",
    default=True,
    show_default=True,
    help="make it the collection's embedder (re-embed + re-index) or only record the checkpoint",
)
@click.option(
    "--select/--no-select",
    default=True,
    show_default=True,
    help="--arch head: hold out a part of the labels and activate the head only if it beats the "
    "served codes there (docs/selection.md); --no-select trains on every label and activates",
)
def train_classifier_command(
    collection: str, arch: str, epochs: int | None, seed: int, dim: int | None, activate: bool, select: bool
) -> None:
    """Train a classifier on the collection's labels (the 'label' metadata); its features become the codes.

    --arch head keeps a pretrained CNN collection's backbone frozen and trains a projection with
    a cosine-margin classifier on its codes; the projection becomes the codes when it beats the
    served codes on a held-out part of the labels (--no-select: always)."""
    _train_classifier(
        collection=collection, arch=arch, epochs=epochs, seed=seed, activate=activate, dim=dim, select=select
    )


@train.command("lenet5")
@click.option("--collection", required=True)
@click.option("--epochs", type=int, default=None, help="default: the arch's recommended count")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--activate/--no-activate", default=True, show_default=True)
def train_lenet5_command(collection: str, epochs: int | None, seed: int, activate: bool) -> None:
    """Same as `cbir train classifier --arch lenet5` (what the hints for a lenet5 collection say)."""
    _train_classifier(collection=collection, arch="lenet5", epochs=epochs, seed=seed, activate=activate)


def _train_classifier(
    *,
    collection: str,
    arch: str,
    epochs: int | None,
    seed: int,
    activate: bool,
    dim: int | None = None,
    select: bool = False,
) -> None:
    from app.services.classifier import train_classifier
    from app.services.selection import format_table

    with _context(threads=os.cpu_count()) as ctx:
        checkpoint = train_classifier(
            ctx,
            collection=collection,
            arch=arch,
            epochs=epochs,
            seed=seed,
            dim=dim,
            activate=activate,
            select=select,
            load_progress=_bar("read images"),
            train_progress=_epoch_bars(),
            embed_progress=_bar("embed + index"),
        )
        summary = (checkpoint.metrics or {}).get("selection")
        if summary:
            click.echo(format_table(summary))
            activate = bool(summary["activated"])
        _report_checkpoint(checkpoint, label=arch, active=activate)


@main.command("eval")
@click.option("--collection", required=True)
@click.option("--queries", default="mnist:test", show_default=True, help="DATASET:SPLIT used as queries")
@click.option(
    "--groundtruth",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Holidays-style JSON {query file: [relevant files]}: each query image of the collection is "
    "ranked against the rest of it (instead of --queries)",
)
@click.option(
    "--embedder", "embedders", multiple=True, help="evaluate this embedder spec (repeat for several)"
)
@click.option("--compare", multiple=True, help="also evaluate: an embedder spec or checkpoint:ID")
@click.option("--whiten", multiple=True, type=int, help="with --groundtruth: PCA-whiten to D dims (0: off)")
@click.option("--qe", multiple=True, type=int, help="with --groundtruth: alpha-QE depth (0: off)")
@click.option("--qe-alpha", type=float, default=None, help="alpha-QE weight exponent (default: 3)")
@click.option("--limit", type=int, default=None, help="use only the first N queries")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object as the last line")
def eval_command(
    collection: str,
    queries: str,
    groundtruth: Path | None,
    embedders: tuple[str, ...],
    compare: tuple[str, ...],
    whiten: tuple[int, ...],
    qe: tuple[int, ...],
    qe_alpha: float | None,
    limit: int | None,
    as_json: bool,
) -> None:
    """P@10, mAP@10 and mAP over the full ranking, one row per embedder (and per whitening and
    query-expansion setting with --groundtruth). Same label = relevant, or the ground truth's lists."""
    from app.services import groundtruth as gt
    from app.services.evaluation import evaluate

    with _context(threads=os.cpu_count()) as ctx:
        if groundtruth is not None:
            rows = gt.evaluate_with_groundtruth(
                ctx,
                collection=collection,
                groundtruth=gt.read_groundtruth(groundtruth),
                embedders=embedders + compare,
                whiten=whiten or None,  # none given: as served
                qe=qe,
                qe_alpha=qe_alpha,
                progress=_bar("embed"),
            )
        else:
            if whiten or qe:
                raise click.UsageError("--whiten and --qe need --groundtruth")
            rows = evaluate(
                ctx, collection=collection, queries=queries, compare=embedders + compare, limit=limit
            )
    width = max([44] + [len(_row_name(row)) for row in rows])
    header = f"{'embedder':<{width}} {'queries':>7} {'P@10':>7} {'mAP@10':>7} {'mAP@all':>7} "
    header += f"{'img/s':>7} {'seconds':>8}"
    click.echo(header)
    click.echo("-" * len(header))
    for row in rows:
        speed = f"{row['embed_img_s']:.1f}" if row.get("embed_img_s") else "-"
        click.echo(
            f"{_row_name(row):<{width}} {row['queries']:>7} {row['p_at_10']:>7.4f} {row['map_at_10']:>7.4f} "
            f"{row['map_all']:>7.4f} {speed:>7} {row['seconds']:>8.1f}"
        )
    if as_json:
        source = {"groundtruth": str(groundtruth)} if groundtruth else {"queries_set": queries}
        click.echo(json.dumps({"collection": collection, **source, "results": rows}))


def _row_name(row: dict[str, Any]) -> str:
    name = str(row["embedder"])
    if row.get("whiten"):
        name += f" +whiten{row['whiten']}"
    if row.get("qe"):
        name += f" +qe{row['qe']}"
    return name


if __name__ == "__main__":
    main()
