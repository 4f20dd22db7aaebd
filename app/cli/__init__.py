"""The ``cbir`` command line: serve, build the demo, import, train, evaluate."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
from pydantic import ValidationError

from app.cli.bench import bench
from app.cli.common import command_context, epoch_bars, progress_bar
from app.cli.duplicates import duplicates
from app.cli.roles import shared_parts_problem, worker
from app.cli.train import train
from app.core.errors import CbirError
from app.core.settings import Settings, get_settings


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
@click.option(
    "--role",
    type=click.Choice(["all", "api"]),
    default=None,
    help="all: the API and the jobs (default, CBIR_ROLE); api: the API only, jobs run by `cbir worker`",
)
def serve(host: str | None, port: int | None, role: str | None) -> None:
    """Run the HTTP service (REST API under /api/v1, web page at /)."""
    import uvicorn

    from app.main import create_app

    settings: Settings = get_settings()
    if host:  # the address decides whether keyless writes are refused (app/api/exposure.py)
        settings = settings.model_copy(update={"host": host})
    if role:
        settings = settings.model_copy(update={"role": role})
    if settings.role != "all" and (problem := shared_parts_problem(settings)) is not None:
        raise click.ClickException(problem)
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
    from app.access.keys import create_first_key

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
    from app.learning.demo import ensure_demo

    settings = get_settings()
    with command_context(threads=os.cpu_count()) as ctx:
        ensure_demo(
            ctx,
            name=name or settings.demo_collection,
            epochs=epochs or settings.demo_epochs or None,
            bar=progress_bar,
            train_bars=epoch_bars,
            say=lambda text: click.echo(text, err=True),
        )


@main.group()
def collections() -> None:
    """List and create collections."""


@collections.command("list")
def collections_list() -> None:
    from app.catalog.collections import list_collections

    with command_context() as ctx:
        for info in list_collections(ctx):
            click.echo(
                f"{info.name}\t{info.embedder}\t{info.embedder_version or 'untrained'}\t"
                f"{info.image_count} images\t{info.index_size} indexed"
            )


@collections.command("create")
@click.argument("name")
@click.option("--embedder", default=None, help="default: CBIR_DEFAULT_EMBEDDER")
def collections_create(name: str, embedder: str | None) -> None:
    from app.catalog.collections import create_collection

    with command_context() as ctx:
        info = create_collection(ctx, name=name, embedder=embedder or ctx.settings.default_embedder)
        click.echo(f"created {info.name} ({info.embedder})")


@collections.command("search-options")
@click.argument("name")
@click.option("--qe", type=int, required=True, help="alpha-query-expansion depth (0: off)")
@click.option("--qe-alpha", type=float, default=3.0, show_default=True)
def collections_search_options(name: str, qe: int, qe_alpha: float) -> None:
    """Set the query-side re-ranking every search of the collection uses."""
    from app.learning.tuning import set_search_options

    with command_context() as ctx:
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
    from app.catalog.collections import get_collection
    from app.ingest.sources.holidays import read_groundtruth
    from app.learning import autotune

    if groundtruth is not None and not now:
        raise click.UsageError("--groundtruth goes with --now")
    with command_context(threads=os.cpu_count()) as ctx:
        if auto is not None:
            autotune.set_autotune(ctx, collection=name, on=auto == "on")
        if now:
            truth = read_groundtruth(groundtruth) if groundtruth is not None else None
            autotune.tune_collection(ctx, collection=name, groundtruth=truth)
        click.echo(json.dumps(get_collection(ctx, name).tuning, indent=1))


@collections.command("reembed")
@click.argument("name")
@click.option("--embedder", "spec", required=True, help="a pretrained embedder spec: efficientnet_lite0 ...")
def collections_reembed(name: str, spec: str) -> None:
    """Switch a collection to another pretrained embedder: every image re-embedded, then served.
    Searches (of a server on the same data) use the old vectors until the new ones are complete;
    if this command is interrupted, the server resumes the job on its next start."""
    from app.ingest import jobs
    from app.learning.job_kinds import job_runner
    from app.learning.reembed import check_reembed

    with command_context(threads=os.cpu_count()) as ctx:
        spec, model = check_reembed(ctx, collection=name, embedder=spec)
        runner = job_runner(ctx)
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
    from app.learning.tuning import whiten_collection

    with command_context(threads=os.cpu_count()) as ctx:
        saved = whiten_collection(
            ctx, collection=name, dim=dim, shrinkage=shrinkage, progress=progress_bar("embed")
        )
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

    from app.catalog.collections import get_collection
    from app.ingest import jobs
    from app.ingest.sources.choose import SourceRequest, choose_source
    from app.learning.job_kinds import job_runner

    with command_context(threads=os.cpu_count()) as ctx:
        get_collection(ctx, collection)  # fail before copying anything

        # The job deletes its uploads when done: an archive is handed to it as a copy.
        def keep_copy(original: Path, suffix: str) -> Path:
            ctx.settings.tmp_dir.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=ctx.settings.tmp_dir, prefix="import-")
            os.close(fd)
            shutil.copyfile(original, tmp)
            return jobs.keep_upload(ctx, Path(tmp), suffix=suffix)

        wanted = SourceRequest.from_argument(source, layout=layout, manifest=manifest, urls=urls)
        # the operator's own files: not confined to CBIR_IMPORT_ROOTS
        parsed = choose_source(wanted, settings=ctx.settings, roots=None, keep=keep_copy)
        runner = job_runner(ctx)
        job_id = runner.create_job(collection=collection, source=parsed, creator="admin")  # the operator
        update = progress_bar(f"import {source}")
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
    from app.data.db import Database

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
    from app.access.keys import Scope, create_key

    with _database() as db:
        info, secret = create_key(db, name=name, scope=Scope[scope])
    click.echo(f"created {info.scope.name} key {info.name!r}; it is shown only now:", err=True)
    click.echo(secret)


@keys.command("list")
def keys_list() -> None:
    """The keys with their scope and visible prefix (never the secret)."""
    from app.access.keys import list_keys, parse_config_keys

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
    from app.access.keys import revoke_key

    with _database() as db:
        info = revoke_key(db, name)
    click.echo(f"revoked {info.name!r}")


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
    from app.ingest.sources.holidays import read_groundtruth
    from app.learning import groundtruth as gt
    from app.learning.evaluation import evaluate

    with command_context(threads=os.cpu_count()) as ctx:
        if groundtruth is not None:
            rows = gt.evaluate_with_groundtruth(
                ctx,
                collection=collection,
                groundtruth=read_groundtruth(groundtruth),
                embedders=embedders + compare,
                whiten=whiten or None,  # none given: as served
                qe=qe,
                qe_alpha=qe_alpha,
                progress=progress_bar("embed"),
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


main.add_command(bench)
main.add_command(duplicates)
main.add_command(train)
main.add_command(worker)

if __name__ == "__main__":
    main()
