"""``cbir bench``: throughput and retrieval-quality benchmarks on this machine."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
from pydantic import ValidationError

from app.core.errors import CbirError
from app.core.settings import get_settings


@click.group()
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

    from app.bench import embedding as service
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
    from app.bench import indexes as service

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
    from app.bench import imports as service

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
    from app.bench import quality as service
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


@bench.command("search")
@click.option(
    "--backends",
    default=None,
    help="comma-separated: faiss (in process), milvus (a milvus-lite server this run starts); "
    "default faiss,milvus, or none with --http",
)
@click.option(
    "--http", "http", is_flag=True, help="time single and batch searches over HTTP (a server this run starts)"
)
@click.option("--url", default=None, help="with --http: a running service instead (http://127.0.0.1:8000)")
@click.option(
    "--batch-size", type=click.IntRange(min=1, max=100), default=100, show_default=True, help="--http"
)
@click.option(
    "--collection", default=None, help="default: CBIR_DEMO_COLLECTION (mnist, built by `cbir demo`)"
)
@click.option(
    "--queries", type=click.IntRange(min=10), default=200, show_default=True, help="per filter / per mode"
)
@click.option("--k", "k", type=click.IntRange(min=1, max=1000), default=10, show_default=True)
@click.option("--kind", default=None, help="a FAISS factory string (default: the collection's kind)")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object as the last line")
def bench_search_command(
    backends: str | None,
    http: bool,
    url: str | None,
    batch_size: int,
    collection: str | None,
    queries: int,
    k: int,
    kind: str | None,
    as_json: bool,
) -> None:
    """Search latency: p50/p95 through each vector store, plain and with a label filter; with
    --http, single searches one request at a time against batches, over HTTP."""
    from app.bench import http_search
    from app.bench import search as service

    say = lambda text: click.echo(text, err=True)  # noqa: E731
    http = http or url is not None
    summary: dict[str, Any] = {}
    try:
        settings = get_settings()
        name = collection or settings.demo_collection
        if backends is not None or not http:
            result = service.bench_search(
                settings,
                collection=name,
                backends=service.parse_backends(backends or "faiss,milvus"),
                queries=queries,
                k=k,
                kind=kind,
                say=say,
            )
            click.echo(service.table(result))
            summary.update(result.summary())
        if http:
            with http_search.server(settings, url=url, say=say) as base:
                timed = http_search.run_http(
                    url=base, collection=name, queries=queries, k=k, batch_size=batch_size, say=say
                )
            click.echo(http_search.table(timed))
            summary.update(timed.summary())
    except ValidationError as exc:
        raise click.ClickException(f"invalid CBIR_* setting: {exc}") from None
    except CbirError as exc:
        raise click.ClickException(exc.detail) from None
    if as_json:
        click.echo(json.dumps(summary))


@bench.command("duplicates")
@click.option(
    "--folder",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="distinct photos (default: CBIR_DATASETS_DIR/inria-holidays-dev/jpg)",
)
@click.option(
    "--sample", type=click.IntRange(min=1), default=100, show_default=True, help="photos given altered copies"
)
@click.option(
    "--embedder", default="efficientnet_lite0", show_default=True, help="the collection's embedder spec"
)
@click.option(
    "--threshold",
    type=click.FloatRange(min=-1.0, max=1.0),
    default=None,
    help="cosine threshold of the job (default: the job's default for the collection)",
)
@click.option("--seed", type=int, default=0, show_default=True, help="which photos are copied")
@click.option(
    "--strength",
    type=click.Choice(["weak", "standard", "strong"]),
    default="standard",
    show_default=True,
    help="how far the copies are altered",
)
@click.option("--json", "as_json", is_flag=True, help="print one JSON object as the last line")
def bench_duplicates_command(
    folder: Path | None,
    sample: int,
    embedder: str,
    threshold: float | None,
    seed: int,
    strength: str,
    as_json: bool,
) -> None:
    """Pair precision and recall of the near-duplicate job on altered copies of photos, beside a
    perceptual-hash baseline (pHash, Hamming <= 10), per alteration."""
    from app.bench import duplicates as service

    try:
        settings = get_settings()
        result = service.run_bench(
            settings,
            folder=folder or service.default_folder(settings),
            sample=sample,
            embedder=embedder,
            threshold=threshold,
            seed=seed,
            strength=strength,
            say=lambda text: click.echo(text, err=True),
        )
    except ValidationError as exc:
        raise click.ClickException(f"invalid CBIR_* setting: {exc}") from None
    except CbirError as exc:
        raise click.ClickException(exc.detail) from None
    for line in service.format_table(result):
        click.echo(line)
    if as_json:
        click.echo(json.dumps(result.summary()))
