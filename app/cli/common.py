"""What the ``cbir`` commands share: progress bars and a service context per command."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import click
from pydantic import ValidationError
from tqdm import tqdm

from app.context import AppContext, open_context
from app.core.errors import CbirError
from app.core.settings import get_settings


def progress_bar(description: str) -> Callable[[int, int | None], None]:
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


def epoch_bars(name: str = "") -> Callable[[int, int, int, float], None]:
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
def command_context(*, threads: int | None = None) -> Iterator[AppContext]:
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
