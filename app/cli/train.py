"""``cbir train``: a collection's own embedder, chosen on its labels or trained without them."""

from __future__ import annotations

import os
from typing import Any

import click

from app.cli.common import command_context, epoch_bars, progress_bar


def _report_checkpoint(checkpoint: Any, *, label: str, active: bool) -> None:
    losses = checkpoint.metrics.get("epoch_losses", [])
    click.echo(
        f"checkpoint {checkpoint.id}: {checkpoint.version} ({label}, {len(losses)} epochs, "
        f"final loss {losses[-1] if losses else float('nan'):.4f}) -> {checkpoint.path}"
        + (" [active]" if active else "")
    )


@click.group()
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
    from app.learning.training import train_cdae

    with command_context(threads=os.cpu_count()) as ctx:
        if select and preset is None:
            from app.learning import selection

            outcome = selection.select_and_train(
                ctx,
                collection=collection,
                epochs=epochs,
                seed=seed,
                activate=activate,
                screen_images=screen_images or selection.SCREEN_IMAGES,
                screen_epochs=screen_epochs or selection.SCREEN_EPOCHS,
                full_budget_s=budget,
                load_progress=progress_bar("read images"),
                train_bars=epoch_bars,
                embed_progress=progress_bar("embed + index"),
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
            load_progress=progress_bar("read images"),
            train_progress=epoch_bars(),
            embed_progress=progress_bar("embed + index"),
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
    from app.learning.classifier import train_classifier
    from app.learning.selection import format_table

    with command_context(threads=os.cpu_count()) as ctx:
        checkpoint = train_classifier(
            ctx,
            collection=collection,
            arch=arch,
            epochs=epochs,
            seed=seed,
            dim=dim,
            activate=activate,
            select=select,
            load_progress=progress_bar("read images"),
            train_progress=epoch_bars(),
            embed_progress=progress_bar("embed + index"),
        )
        summary = (checkpoint.metrics or {}).get("selection")
        if summary:
            click.echo(format_table(summary))
            activate = bool(summary["activated"])
        _report_checkpoint(checkpoint, label=arch, active=activate)
