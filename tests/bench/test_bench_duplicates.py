"""`cbir bench duplicates`: the alterations, the pair counting on cases whose truth is known, the
pHash baseline's Hamming pairs, and one run of the real import and job on a handful of photos."""

from __future__ import annotations

import io
import json
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from app.bench.alterations import ALTERATIONS, STRENGTHS, alter, encode
from app.bench.duplicates import ORIGINAL, Entry, hamming_pairs, make_folder, photos_in, score_groups
from app.cli import main
from tests.conftest import DATASETS_DIR

HOLIDAYS = DATASETS_DIR / "inria-holidays-dev" / "jpg"


def _photo() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, size=(60, 80, 3), dtype=np.uint8), "RGB")


@pytest.mark.parametrize("strength", STRENGTHS)
def test_every_alteration_changes_the_photo_the_same_way_each_time(strength: str) -> None:
    photo = _photo()
    for name in ALTERATIONS:
        once, again = alter(photo, name=name, strength=strength), alter(photo, name=name, strength=strength)
        assert once.mode == "RGB"
        assert np.array_equal(np.asarray(once), np.asarray(again)), name
        assert once.size != photo.size or not np.array_equal(np.asarray(once), np.asarray(photo)), name
        assert Image.open(io.BytesIO(encode(once))).format == "JPEG"
    assert alter(photo, name="half", strength="standard").size == (40, 30)
    assert alter(photo, name="crop80", strength="standard").size == (64, 48)


def _entries(families: list[list[str]]) -> list[Entry]:
    """Families of [original, alteration, ...]: entry names '<family>-<alteration>'."""
    return [
        Entry(f"{family}-{alteration}", family, alteration)
        for family, members in enumerate(families)
        for alteration in members
    ]


def test_pair_counts_on_a_case_whose_truth_is_known() -> None:
    # family 0: original + half + flip; family 1: original + half; family 2: an original alone
    entries = _entries([[ORIGINAL, "half", "flip"], [ORIGINAL, "half"], [ORIGINAL]])
    # the job groups {0-original, 0-half} and {1-original, 1-half, 2-original}; 0-flip is alone
    group_of = {"0-original": 0, "0-half": 0, "1-original": 1, "1-half": 1, "2-original": 1}
    result = score_groups(entries, group_of=group_of, name="x", threshold=0.9, seconds=1.0)
    # true pairs: 3 in family 0, 1 in family 1 = 4; predicted: 1 + 3 = 4; true predicted: 1 + 1 = 2
    assert (result.true_pairs, result.predicted_pairs, result.groups) == (4, 4, 2)
    assert result.pair_precision == pytest.approx(0.5) and result.pair_recall == pytest.approx(0.5)
    assert result.per_alteration == {"half": 1.0, "flip": 0.0}


def test_nothing_grouped_is_full_precision_and_no_recall() -> None:
    entries = _entries([[ORIGINAL, "half"], [ORIGINAL]])
    result = score_groups(entries, group_of={}, name="x", threshold=0.9, seconds=0.0)
    assert (result.pair_precision, result.pair_recall, result.groups) == (1.0, 0.0, 0)


def test_hamming_pairs_are_every_pair_within_the_distance() -> None:
    rng = np.random.default_rng(1)
    base = rng.integers(0, 2**63, size=40, dtype=np.uint64)
    flips = np.uint64(1) << rng.integers(0, 64, size=40).astype(np.uint64)
    codes = np.concatenate([base, base ^ flips])  # each code and a one-bit neighbour
    left, right = hamming_pairs(codes, distance=10, block=7)
    found = set(zip(left.tolist(), right.tolist(), strict=True))
    expected = {
        (i, j)
        for i, j in combinations(range(len(codes)), 2)
        if bin(int(codes[i]) ^ int(codes[j])).count("1") <= 10
    }
    assert found == expected and {(i, i + 40) for i in range(40)} <= found


def test_the_scratch_folder_holds_every_photo_and_the_copies_of_the_sample(tmp_path: Path) -> None:
    photos = []
    for i in range(4):
        path = tmp_path / "in" / f"p{i}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(np.full((20, 30, 3), 60 * i, dtype=np.uint8), "RGB").save(path)
        photos.append(path)
    entries = make_folder(photos, out=tmp_path / "out", sample=2, seed=0)
    assert [e.alteration for e in entries[:4]] == [ORIGINAL] * 4
    assert len(entries) == 4 + 2 * len(ALTERATIONS)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(e.name for e in entries)
    assert len({e.family for e in entries if e.alteration != ORIGINAL}) == 2


def test_identical_files_count_once_as_the_import_stores_them(tmp_path: Path) -> None:
    for name, shade in (("a.png", 0), ("b.png", 90), ("c.png", 0), ("notes.txt", 1)):
        path = tmp_path / name
        if name.endswith(".png"):
            Image.fromarray(np.full((8, 8, 3), shade, dtype=np.uint8), "RGB").save(path)
        else:
            path.write_text("not a photo")
    photos, skipped = photos_in(tmp_path)
    assert [p.name for p in photos] == ["a.png", "b.png"] and skipped == 1


def test_bench_duplicates_runs_the_import_and_the_job_and_prints_the_json_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    for path in sorted(HOLIDAYS.glob("*.jpg"))[:5]:
        (folder / path.name).write_bytes(path.read_bytes())
    monkeypatch.setenv("CBIR_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("CBIR_CNN_RUNTIME", "torch")
    from app.core.settings import get_settings

    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(
            main,
            ["bench", "duplicates", "--folder", str(folder)]
            + ["--sample", "2", "--embedder", "tiny", "--threshold", "0.95", "--json"],
        )
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["images"] == 5 + 2 * len(ALTERATIONS) and summary["copies"] == 2 * len(ALTERATIONS)
    job, phash = summary["methods"]
    assert job["name"] == "tiny" and job["threshold"] == 0.95 and phash["name"] == "phash"
    for method in summary["methods"]:
        assert set(method) >= {"name", "threshold", "pair_precision", "pair_recall", "seconds"}
        assert set(method["per_alteration"]) == set(ALTERATIONS)
        assert 0.0 <= method["pair_precision"] <= 1.0 and 0.0 <= method["pair_recall"] <= 1.0
        assert method["true_pairs"] == 2 * (len(ALTERATIONS) + 1) * len(ALTERATIONS) // 2


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--folder", "{missing}"], "no folder of photos"),
        (["--folder", "{empty}"], "needs at least 2"),
        (["--sample", "0"], "Invalid value for '--sample'"),
    ],
)
def test_bench_duplicates_refuses_bad_input_with_a_clear_message(
    tmp_path: Path, args: list[str], says: str
) -> None:
    (tmp_path / "empty").mkdir()
    filled = [a.format(missing=tmp_path / "missing", empty=tmp_path / "empty") for a in args]
    result = CliRunner().invoke(main, ["bench", "duplicates", *filled, "--json"])
    assert result.exit_code != 0 and says in result.output
    assert "Traceback" not in result.output
