"""``python -m app.cli``: the same as the ``cbir`` command."""

from app.cli import main

main()
