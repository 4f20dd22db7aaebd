"""``cbir duplicates find|list|resolve``: near-duplicate groups of a collection from the shell."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from typing import Any

import click

from app.cli.common import command_context


@click.group()
def duplicates() -> None:
    """Near-duplicate groups: find them, page through them, resolve them."""


@duplicates.command("find")
@click.argument("collection")
@click.option(
    "--threshold",
    type=float,
    default=None,
    help="cosine of the served codes (default: the embedder's default)",
)
@click.option("--json", "as_json", is_flag=True, help="print one JSON object as the last line")
def find(collection: str, threshold: float | None, as_json: bool) -> None:
    """Find the collection's near-duplicate groups now (in this process) and store them, replacing
    the previous run's; resolutions made before are kept."""
    from app.duplicates.job import find_duplicates

    with command_context(threads=os.cpu_count()) as ctx:
        summary = find_duplicates(ctx, collection=collection, threshold=threshold)
    click.echo(
        f"{collection}: {summary['images']} images, {summary['pairs']} pairs at cosine >= "
        f"{summary['threshold']:g}, {summary['groups']} groups ({summary['open']} open, "
        f"{summary['resolved']} resolved, {summary['reopened']} reopened) in {summary['seconds']:.1f} s"
        + (
            f"; {summary['truncated_rows']} images had more neighbours than kept"
            if summary["truncated_rows"]
            else ""
        )
    )
    if as_json:
        click.echo(json.dumps(summary))


@duplicates.command("list")
@click.argument("collection")
@click.option("--status", type=click.Choice(["open", "resolved", "all"]), default="open", show_default=True)
@click.option("--page", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--per-page", type=click.IntRange(1, 1000), default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print the page as one JSON object")
def list_(collection: str, status: str, page: int, per_page: int, as_json: bool) -> None:
    """The latest run's groups, largest first: members (id and file name) and best pair score."""
    from app.duplicates.groups import list_groups

    with command_context() as ctx:
        found = list_groups(ctx, collection=collection, status=status, page=page, per_page=per_page)
    if as_json:
        click.echo(json.dumps(asdict(found), default=str))
        return
    if found.run is None:
        click.echo(f"{collection}: no duplicate run yet (cbir duplicates find {collection})")
        return
    run = found.run
    click.echo(
        f"{collection}: run of {run.created_at:%Y-%m-%d %H:%M} at cosine >= {run.threshold:g}; "
        f"{found.counts['open']} open, {found.counts['resolved']} resolved; {status}: {found.total} "
        f"(page {page})"
    )
    for group in found.groups:
        click.echo(_group_line(group))


def _group_line(group: Any) -> str:
    state = group.status + (", reopened" if group.reopened else "")
    best = max((p.score for p in group.pairs), default=0.0)
    names = ", ".join(
        f"{m.image_id}{'*' if m.new else ''} {m.original_name or ''}".rstrip() for m in group.members
    )
    resolution = group.resolution
    decided = ""
    if resolution is not None:
        decided = f"; keep {resolution.keep}" if resolution.action == "keep" else "; not duplicates"
    return f"group {group.id} ({group.size} images, {state}, best {best:.3f}{decided}): {names}"


@duplicates.command("resolve")
@click.argument("collection")
@click.argument("group_id", type=click.IntRange(min=1))
@click.option(
    "--keep", type=click.IntRange(min=1), default=None, help="the image kept; the others are duplicates"
)
@click.option("--not-duplicates", is_flag=True, help="the images only look alike")
@click.option("--reopen", is_flag=True, help="clear the group's resolution")
def resolve(collection: str, group_id: int, keep: int | None, not_duplicates: bool, reopen: bool) -> None:
    """Resolve a group of the latest run: --keep IMAGE_ID, --not-duplicates or --reopen."""
    from app.duplicates.groups import resolve_group

    if sum((keep is not None, not_duplicates, reopen)) != 1:
        raise click.UsageError("give exactly one of --keep IMAGE_ID, --not-duplicates, --reopen")
    action = "keep" if keep is not None else "not_duplicates" if not_duplicates else None
    with command_context() as ctx:
        group = resolve_group(ctx, collection=collection, group_id=group_id, action=action, keep=keep)
    click.echo(_group_line(group))
