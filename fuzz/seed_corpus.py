"""Write the decode corpus seed (tests/corpus/decode/): small files of the shapes of plan items 1-12.

Run once, and again when fuzz/samples.py gains a shape: ``python fuzz/seed_corpus.py``. Files
already there (crashers atheris found, committed by hand) are kept; seed files are rewritten.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fuzz.samples import seeds  # noqa: E402

CORPUS = ROOT / "tests" / "corpus" / "decode"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", type=Path, default=CORPUS)
    folder = parser.parse_args(argv).folder
    folder.mkdir(parents=True, exist_ok=True)
    files = seeds()
    for name, data in sorted(files.items()):
        (folder / name).write_bytes(data)
    print(f"wrote {len(files)} files, {sum(map(len, files.values()))} bytes, to {folder}")


if __name__ == "__main__":
    main()
