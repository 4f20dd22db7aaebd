"""Import sources: manifest parsing, folder layouts (images, IDX, Holidays), member order and the
resume skip, all without the HTTP layer."""

from __future__ import annotations

import gzip
import io
import json
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import app.ingest.pipeline as pipeline_module
from app.catalog.collections import create_collection
from app.context import AppContext
from app.core.errors import FolderNotAllowed, InvalidRequest
from app.core.settings import Settings
from app.ingest.pipeline import Pipeline
from app.ingest.sources import kinds as sources
from app.ingest.sources.archive import check_archive
from app.ingest.sources.choose import SourceRequest, choose_source
from app.ingest.sources.dataset import check_dataset
from app.ingest.sources.datasets import read_idx
from app.ingest.sources.folder import check_folder
from app.ingest.sources.idx import find_idx
from app.ingest.sources.kinds import (
    ArchiveSource,
    DatasetSource,
    FolderSource,
    HolidaysSource,
    IdxSource,
    ManifestSource,
    Member,
    UrlSource,
)
from app.ingest.sources.manifest import check_manifest
from app.ingest.sources.manifests import MAX_META_CHARS, MAX_META_KEYS, parse_manifest
from tests.conftest import DATASETS_DIR
from tests.holidays import holidays_subset

MNIST = DATASETS_DIR / "mnist"


def write_idx(path: Path, array: np.ndarray) -> Path:
    """``array`` (uint8, (n,) or (n, rows, cols)) as an IDX file, gzipped when ``path`` ends in .gz."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def mnist_subset(folder: Path, n: int = 50, *, stem: str = "t10k") -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` MNIST test digits and labels written as ``<stem>-{images,labels}`` IDX .gz files."""
    if not (MNIST / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"MNIST not found in {MNIST}")
    images = read_idx(MNIST / "t10k-images-idx3-ubyte.gz")[:n]
    labels = read_idx(MNIST / "t10k-labels-idx1-ubyte.gz")[:n]
    folder.mkdir(parents=True, exist_ok=True)
    write_idx(folder / f"{stem}-images-idx3-ubyte.gz", images)
    write_idx(folder / f"{stem}-labels-idx1-ubyte.gz", labels)
    return images, labels


def members_of(source: sources.Source, settings: Settings, *, max_bytes: int | None = None) -> list[Member]:
    return list(
        sources.iter_members(
            source,
            max_bytes=max_bytes or settings.max_upload_bytes,
            datasets_dir=settings.datasets_dir,
            data_dir=settings.data_dir,
        )
    )


def count(source: sources.Source, settings: Settings) -> int | None:
    return sources.count_members(source, datasets_dir=settings.datasets_dir, data_dir=settings.data_dir)


# -- manifests ---------------------------------------------------------------------------------
def test_csv_manifest_keeps_label_and_other_columns_as_metadata() -> None:
    text = "\ufeffPath, Label ,Photographer,year\ncat/1.png,cat,Ann,2019\n dog/2.png ,dog,,2020\n"
    rows = parse_manifest(text.encode(), name="manifest.csv")
    assert [(r.path, r.metadata, r.error) for r in rows] == [
        ("cat/1.png", {"label": "cat", "photographer": "Ann", "year": "2019"}, None),
        ("dog/2.png", {"label": "dog", "year": "2020"}, None),  # empty cells are left out
    ]


@pytest.mark.parametrize("column", ["path", "file", "filename", "member"])
def test_csv_manifest_accepts_each_path_column_name(column: str) -> None:
    (row,) = parse_manifest(f"{column},label\na.png,7\n".encode(), name="list.csv")
    assert (row.path, row.metadata) == ("a.png", {"label": "7"})


def test_bad_csv_rows_become_rows_with_an_error_and_the_rest_is_kept() -> None:
    text = "path,label\na.png,1\n,2\nb.png,3,surplus\nc.png\n"
    rows = parse_manifest(text.encode(), name="manifest.csv")
    assert [r.path for r in rows] == ["a.png", None, None, "c.png"]
    assert rows[1].error == "the row has an empty path"
    assert rows[2].error == "the row has more fields than the header"
    assert rows[3].metadata == {}  # a short row: its missing cells are simply absent


def test_jsonl_manifest_merges_nested_metadata_and_keeps_scalars_only() -> None:
    lines = [
        {"path": "a.png", "label": 3, "metadata": {"camera": "x100", "iso": 200}, "ok": True},
        {"file": "b.png", "tags": ["a", "b"], "nested": {"deep": 1}, "note": None},
    ]
    data = ("\n".join(json.dumps(line) for line in lines) + "\n\n").encode()
    rows = parse_manifest(data, name="manifest.jsonl")
    assert [(r.path, r.metadata) for r in rows] == [
        ("a.png", {"camera": "x100", "iso": 200, "label": "3", "ok": True}),
        ("b.png", {"note": None}),
    ]


def test_jsonl_is_recognised_by_content_whatever_the_name() -> None:
    (row,) = parse_manifest(b'{"path": "a.png", "label": "x"}\n', name="upload.manifest")
    assert (row.path, row.metadata) == ("a.png", {"label": "x"})


def test_bad_jsonl_lines_become_rows_with_an_error() -> None:
    data = b'{"path": "a.png"}\n{"path": \n[1, 2]\n{"label": "no path"}\n{"path": 7}\n'
    rows = parse_manifest(data, name="manifest.jsonl")
    assert rows[0].path == "a.png" and rows[0].error is None
    assert [r.path for r in rows[1:]] == [None] * 4
    assert "not JSON" in rows[1].error and "not a JSON object" in rows[2].error
    assert "no string 'path'" in rows[3].error and "no string 'path'" in rows[4].error


def test_metadata_is_capped_in_keys_and_length() -> None:
    row = {"path": "a.png", "long": "x" * 2000, **{f"k{i:02d}": i for i in range(40)}}
    (parsed,) = parse_manifest(json.dumps(row).encode(), name="m.jsonl")
    assert len(parsed.metadata) == MAX_META_KEYS
    assert len(parsed.metadata["long"]) == MAX_META_CHARS


@pytest.mark.parametrize(
    "data",
    [b"name,label\na.png,1\n", b"", "path,label\nb\xe9.png,1\n".encode("latin-1"), b"\xff\xfe\x00garbage"],
)
def test_unreadable_manifest_raises_invalid_request(data: bytes) -> None:
    with pytest.raises(InvalidRequest):
        parse_manifest(data, name="manifest.csv")


# -- server manifests --------------------------------------------------------------------------
@pytest.fixture
def roots(tmp_path: Path, make_png: Callable[..., bytes]) -> tuple[Path, Path]:
    """(allowed root holding photos/{a,b}.png, a secret folder beside it holding private.png)."""
    root, secret = tmp_path / "root", tmp_path / "secret"
    (root / "photos").mkdir(parents=True)
    secret.mkdir()
    (root / "photos" / "a.png").write_bytes(make_png(1))
    (root / "photos" / "b.png").write_bytes(make_png(2))
    (secret / "private.png").write_bytes(make_png(3))
    return root, secret


def test_server_manifest_rows_outside_the_roots_are_rejected_and_never_read(
    roots: tuple[Path, Path], settings: Settings
) -> None:
    root, secret = roots
    (root / "photos" / "leak.png").symlink_to(secret / "private.png")
    manifest = root / "manifest.csv"
    manifest.write_text(
        "path,label\n"
        "photos/a.png,a\n"
        f"{root}/photos/b.png,b\n"
        "../secret/private.png,x\n"
        f"{secret}/private.png,x\n"
        "photos/leak.png,x\n"
        "photos/missing.png,x\n"
        ",x\n"
    )
    source = check_manifest(manifest, roots=[root])
    assert source == ManifestSource(manifest, (root,))
    members = members_of(source, settings)
    assert [(m.name, m.reject[0] if m.reject else None) for m in members] == [
        ("photos/a.png", None),
        (f"{root}/photos/b.png", None),
        ("../secret/private.png", "path_outside_root"),
        (f"{secret}/private.png", "path_outside_root"),
        ("photos/leak.png", "symlink_outside_root"),
        ("photos/missing.png", "file_unreadable"),
        ("row 7", "manifest_row_invalid"),
    ]
    assert all(m.read is None for m in members if m.reject)
    assert [m.metadata for m in members[:2]] == [{"label": "a"}, {"label": "b"}]
    assert members[0].read is not None and members[0].read() == (root / "photos" / "a.png").read_bytes()
    assert count(source, settings) == len(members)


def test_server_manifest_outside_the_roots_is_not_allowed(roots: tuple[Path, Path]) -> None:
    root, secret = roots
    (secret / "manifest.csv").write_text("path\nprivate.png\n")
    with pytest.raises(FolderNotAllowed):
        check_manifest(secret / "manifest.csv", roots=[root])
    (root / "link.csv").symlink_to(secret / "manifest.csv")
    with pytest.raises(FolderNotAllowed):
        check_manifest(root / "link.csv", roots=[root])
    with pytest.raises(FolderNotAllowed):
        check_manifest(root / ".." / "secret" / "manifest.csv", roots=[root])
    with pytest.raises(FolderNotAllowed):
        check_manifest(secret / "manifest.csv", roots=[])


def test_unreadable_server_manifest_is_refused_before_a_job(roots: tuple[Path, Path]) -> None:
    root, _ = roots
    (root / "bad.csv").write_text("name\na.png\n")
    with pytest.raises(InvalidRequest):
        check_manifest(root / "bad.csv", roots=[root])
    with pytest.raises(InvalidRequest):
        check_manifest(root / "photos", roots=[root])  # a folder, not a file


# -- folders: images, IDX, Holidays ------------------------------------------------------------
def test_image_folder_lists_files_in_name_order_labelled_by_subfolder(
    roots: tuple[Path, Path], settings: Settings, make_png: Callable[..., bytes]
) -> None:
    root, _ = roots
    for name in ("z/1.png", "a/2.png", "a/10.png", ".hidden/3.png", "a/.DS_Store", "top.png"):
        (root / "photos" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "photos" / name).write_bytes(make_png(len(name)))
    source = check_folder(root / "photos", roots=[root], layout="images")
    assert source == FolderSource(root / "photos")
    members = members_of(source, settings)
    assert [(m.name, m.metadata) for m in members] == [
        ("a/10.png", {"label": "a"}),
        ("a/2.png", {"label": "a"}),
        ("a.png", {}),
        ("b.png", {}),
        ("top.png", {}),
        ("z/1.png", {"label": "z"}),
    ]
    assert [m.name for m in members_of(source, settings)] == [m.name for m in members]  # stable
    assert count(source, settings) == 6


def test_idx_folder_is_detected_and_lists_each_digit_with_its_label(
    tmp_path: Path, settings: Settings
) -> None:
    images, labels = mnist_subset(tmp_path / "digits", 50)
    source = check_folder(tmp_path / "digits")  # layout auto
    assert source == check_folder(tmp_path / "digits", layout="idx")
    assert source == IdxSource(
        (tmp_path / "digits" / "t10k-images-idx3-ubyte.gz",),
        (tmp_path / "digits" / "t10k-labels-idx1-ubyte.gz",),
    )
    assert count(source, settings) == 50
    members = members_of(source, settings)
    assert [m.name for m in members] == [f"t10k-{i:05d}.png" for i in range(50)]
    assert members[3].metadata == {"file": "t10k-images-idx3-ubyte.gz", "index": 3, "label": str(labels[3])}
    decoded = np.asarray(Image.open(io.BytesIO(members[3].read())))  # type: ignore[misc]
    assert decoded.dtype == np.uint8 and np.array_equal(decoded, images[3])


def test_idx_files_put_training_before_test_and_prefer_one_copy(tmp_path: Path, settings: Settings) -> None:
    folder = tmp_path / "digits"
    mnist_subset(folder, 5, stem="t10k")
    mnist_subset(folder, 3, stem="train")
    # the same file plain beside its .gz: imported once
    write_idx(folder / "train-images-idx3-ubyte", read_idx(folder / "train-images-idx3-ubyte.gz"))
    write_idx(folder / "extra-images-idx3-ubyte.gz", np.zeros((2, 4, 4), np.uint8))  # no labels file
    source = find_idx(folder)
    assert source is not None
    assert [p.name for p in source.images] == [
        "train-images-idx3-ubyte",
        "extra-images-idx3-ubyte.gz",
        "t10k-images-idx3-ubyte.gz",
    ]
    assert [p.name if p else None for p in source.labels] == [
        "train-labels-idx1-ubyte.gz",
        None,
        "t10k-labels-idx1-ubyte.gz",
    ]
    members = members_of(source, settings)
    assert count(source, settings) == len(members) == 3 + 2 + 5
    assert [m.name for m in members[3:7]] == [
        "extra-00000.png",
        "extra-00001.png",
        "t10k-00000.png",
        "t10k-00001.png",
    ]
    assert "label" not in members[3].metadata and "label" in members[5].metadata


def test_idx_file_linked_from_outside_the_roots_is_not_imported(
    tmp_path: Path, roots: tuple[Path, Path], settings: Settings
) -> None:
    root, secret = roots
    mnist_subset(secret, 5)
    (root / "digits").mkdir()
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (root / "digits" / name).symlink_to(secret / name)
    with pytest.raises(InvalidRequest):
        check_folder(root / "digits", roots=[root], layout="idx")
    source = check_folder(root / "digits", roots=[root])
    assert not isinstance(source, IdxSource)
    assert all(m.reject is not None for m in members_of(source, settings))


def test_layout_idx_on_a_folder_without_idx_files_is_invalid(roots: tuple[Path, Path]) -> None:
    root, _ = roots
    with pytest.raises(InvalidRequest, match="idx3"):
        check_folder(root / "photos", roots=[root], layout="idx")
    with pytest.raises(InvalidRequest, match="groundtruth.json"):
        check_folder(root / "photos", roots=[root], layout="holidays")
    with pytest.raises(InvalidRequest, match="layout"):
        check_folder(root / "photos", roots=[root], layout="mnist")
    with pytest.raises(InvalidRequest, match="not a folder"):
        check_folder(root / "photos" / "a.png", roots=[root])


def test_holidays_folder_labels_each_image_by_its_query(tmp_path: Path, settings: Settings) -> None:
    folder = tmp_path / "holidays"
    truth = holidays_subset(folder, (1000, 1001, 1002, 1003))
    (folder / "groundtruth.json").write_text(json.dumps(truth))
    (folder / "notes.txt").write_text("not an image")
    source = check_folder(folder)  # auto
    assert source == HolidaysSource(folder) == check_folder(folder, layout="holidays")
    members = members_of(source, settings)
    expected = {q: (q[:-4], "query") for q in truth} | {
        r: (q[:-4], "relevant") for q, rel in truth.items() for r in rel
    }
    assert len(members) == len(expected) == 10 == count(source, settings)
    assert [m.name for m in members] == sorted(expected)
    assert {m.name: (m.metadata["label"], m.metadata["role"]) for m in members} == expected
    assert members[0].metadata == {"label": "100000", "role": "query"}


def test_holidays_images_may_sit_in_a_jpg_subfolder(tmp_path: Path, settings: Settings) -> None:
    folder = tmp_path / "holidays"
    truth = holidays_subset(folder / "jpg", (1000,))
    (folder / "groundtruth.json").write_text(json.dumps(truth))
    (folder / "jpg" / "999999.jpg").write_bytes((folder / "jpg" / "100000.jpg").read_bytes())
    members = members_of(check_folder(folder), settings)
    assert [(m.name, m.metadata) for m in members] == [
        ("100000.jpg", {"label": "100000", "role": "query"}),
        ("100001.jpg", {"label": "100000", "role": "relevant"}),
        ("100002.jpg", {"label": "100000", "role": "relevant"}),
        ("999999.jpg", {}),  # in no group: no label
    ]


def test_holidays_folder_with_a_broken_groundtruth_is_invalid(tmp_path: Path) -> None:
    (tmp_path / "h").mkdir()
    (tmp_path / "h" / "groundtruth.json").write_text("[1, 2]")
    with pytest.raises(InvalidRequest):
        check_folder(tmp_path / "h")


# -- datasets -----------------------------------------------------------------------------------
def test_dataset_split_all_counts_train_and_test(settings: Settings) -> None:
    if not (MNIST / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"MNIST not found in {MNIST}")
    assert check_dataset("mnist", "all") == DatasetSource("mnist", "all")
    assert count(DatasetSource("mnist", "test"), settings) == 10_000
    assert count(DatasetSource("mnist", "all"), settings) == 70_000
    first = next(
        sources.iter_members(
            DatasetSource("mnist", "all"),
            max_bytes=1,
            datasets_dir=settings.datasets_dir,
            data_dir=settings.data_dir,
        )
    )
    assert first.name == "mnist-train-00000.png"
    assert first.metadata == {"label": "5", "dataset": "mnist", "split": "train", "index": 0}


@pytest.mark.parametrize(("dataset", "split"), [("mnist", "validation"), ("cifar", "all")])
def test_unknown_dataset_or_split_is_invalid(dataset: str, split: str) -> None:
    with pytest.raises(InvalidRequest):
        check_dataset(dataset, split)


# -- descriptions survive a restart ---------------------------------------------------------------
def test_each_source_is_rebuilt_from_its_stored_parameters(settings: Settings, tmp_path: Path) -> None:
    data_dir = settings.data_dir
    uploads = data_dir / "uploads"
    for source in (
        ArchiveSource(uploads / "a.archive", "photos.zip"),
        ArchiveSource(uploads / "a.archive", "photos.tar", uploads / "b.manifest"),
        FolderSource(tmp_path / "photos"),
        HolidaysSource(tmp_path / "holidays"),
        IdxSource(
            (tmp_path / "a-images-idx3-ubyte.gz", tmp_path / "b-images-idx3-ubyte"), (tmp_path / "x", None)
        ),
        ManifestSource(tmp_path / "m.csv", (tmp_path,)),
        ManifestSource(tmp_path / "m.csv", None),
        DatasetSource("mnist", "all"),
    ):
        params = json.loads(json.dumps(sources.describe(source, data_dir=data_dir)))
        assert sources.from_params(params, data_dir=data_dir) == source
    with pytest.raises(ValueError):
        sources.from_params({"source": "ftp"}, data_dir=data_dir)


def test_stored_parameters_keep_their_format(settings: Settings, tmp_path: Path) -> None:
    """Jobs stored by any version resume: each kind's parameters, key by key."""
    data_dir = settings.data_dir
    stored = [
        (
            ArchiveSource(
                data_dir / "uploads" / "a.archive", "p.zip", data_dir / "uploads" / "b.manifest", "m.csv"
            ),
            {
                "source": "archive",
                "filename": "p.zip",
                "path": "uploads/a.archive",
                "manifest": "uploads/b.manifest",
                "manifest_name": "m.csv",
            },
        ),
        (FolderSource(tmp_path), {"source": "folder", "path": str(tmp_path)}),
        (HolidaysSource(tmp_path), {"source": "holidays", "path": str(tmp_path)}),
        (
            IdxSource((tmp_path / "a",), (None,)),
            {"source": "idx", "images": [str(tmp_path / "a")], "labels": [None]},
        ),
        (
            ManifestSource(tmp_path / "m.csv", (tmp_path,)),
            {"source": "manifest", "path": str(tmp_path / "m.csv"), "roots": [str(tmp_path)]},
        ),
        (DatasetSource("mnist", "test"), {"source": "dataset", "dataset": "mnist", "split": "test"}),
        (
            UrlSource(("https://example.org/a.png",)),
            {"source": "urls", "urls": ["https://example.org/a.png"]},
        ),
    ]
    for source, params in stored:
        assert sources.describe(source, data_dir=data_dir) == params
        assert list(sources.describe(source, data_dir=data_dir)) == list(params)  # same key order
        assert sources.from_params(params, data_dir=data_dir) == source
    assert sorted(sources.KINDS) == sorted(params["source"] for _, params in stored)


def test_the_command_line_and_a_json_request_choose_the_same_source(
    settings: Settings, tmp_path: Path
) -> None:
    """`cbir import SOURCE` and the route's JSON body go through one choose_source; the command line
    is not confined to the import roots."""
    (tmp_path / "photos" / "cat").mkdir(parents=True)
    (tmp_path / "photos" / "cat" / "1.png").write_bytes(b"x")
    manifest = tmp_path / "list.csv"
    manifest.write_text("path,label\nphotos/cat/1.png,cat\n")
    roots = [tmp_path]
    for argument, body in (
        (str(tmp_path / "photos"), {"folder": str(tmp_path / "photos")}),
        (str(manifest), {"manifest": str(manifest)}),
        ("mnist:test", {"dataset": "mnist", "split": "test"}),
    ):
        by_cli = choose_source(SourceRequest.from_argument(argument), settings=settings, roots=None)
        by_http = choose_source(SourceRequest.named(**body), settings=settings, roots=roots)
        assert type(by_cli) is type(by_http)
        assert by_cli.kind == by_http.kind
    assert SourceRequest.named(folder="/x").reads_server_files
    assert not SourceRequest.named(dataset="mnist").reads_server_files
    with pytest.raises(InvalidRequest, match="exactly one"):
        SourceRequest.named(dataset="mnist", folder="/x")
    with pytest.raises(InvalidRequest, match="exactly one"):
        SourceRequest.named()
    with pytest.raises(InvalidRequest, match='"path" goes with "root"'):
        SourceRequest.named(dataset="mnist", path="a")
    with pytest.raises(FolderNotAllowed):
        choose_source(SourceRequest.named(folder=str(tmp_path / "photos")), settings=settings, roots=[])


# -- fixed order and the resume skip --------------------------------------------------------------
def recorded_members(n: int, make_png: Callable[..., bytes], calls: list[str]) -> list[Member]:
    def reader(name: str, seed: int) -> Callable[[], bytes]:
        def read() -> bytes:
            calls.append(name)
            return make_png(seed, size=(8, 8))

        return read

    return [Member(f"{i:03d}.png", {"i": i}, read=reader(f"{i:03d}.png", i)) for i in range(n)]


def test_read_from_start_never_reads_the_members_before_it(
    ctx: AppContext, make_png: Callable[..., bytes]
) -> None:
    create_collection(ctx, name="order", embedder="tiny")
    pipeline = Pipeline(ctx, "order")
    calls: list[str] = []
    members = recorded_members(150, make_png, calls)
    members[120] = Member("rejected.png", reject=("unsafe_path", "no"))
    chunks = list(pipeline.read(members, start=100))
    staged = [s for chunk in chunks for s in chunk.items]
    assert [s.position for s in staged] == list(range(100, 150))
    assert calls == [f"{i:03d}.png" for i in range(100, 150) if i != 120]
    assert chunks[-1].end == 150
    assert staged[20].result is not None and staged[20].result.code == "unsafe_path"
    assert all(s.sha256 for s in staged if s.result is None)


def test_read_chunks_end_where_the_next_one_starts(ctx: AppContext, make_png: Callable[..., bytes]) -> None:
    create_collection(ctx, name="order", embedder="tiny")
    calls: list[str] = []
    n = 2 * pipeline_module.CHUNK_ITEMS + 22
    chunks = list(Pipeline(ctx, "order").read(recorded_members(n, make_png, calls)))
    assert [c.end for c in chunks] == [pipeline_module.CHUNK_ITEMS, 2 * pipeline_module.CHUNK_ITEMS, n]
    assert [s.position for c in chunks for s in c.items] == list(range(n))
    assert len(calls) == n


def test_a_member_that_fails_to_read_is_rejected_alone(
    ctx: AppContext, make_png: Callable[..., bytes]
) -> None:
    create_collection(ctx, name="order", embedder="tiny")

    def boom() -> bytes:
        raise OSError("disk on fire")

    members = [Member("ok.png", read=lambda: make_png(1)), Member("bad.png", read=boom)]
    (chunk,) = Pipeline(ctx, "order").read(members)
    assert chunk.items[0].result is None
    assert chunk.items[1].result is not None
    assert (chunk.items[1].result.code, chunk.items[1].result.detail) == (
        "archive_member_unreadable",
        "disk on fire",
    )


def test_archive_member_order_is_fixed_and_manifest_rows_come_in_archive_order(
    tmp_path: Path, settings: Settings, make_png: Callable[..., bytes]
) -> None:
    from tests.api.test_imports import make_tar, make_zip

    members = {"b/2.png": make_png(2), "a/1.png": make_png(1), "c/3.png": make_png(3)}
    manifest = b"path,label\nc/3.png,three\nnot/there.png,x\na/1.png,one\n"
    for name, data in (
        ("a.zip", make_zip({**members, "manifest.csv": manifest})),
        ("a.tar", make_tar({"./manifest.csv": manifest, **{f"./{n}": d for n, d in members.items()}})),
    ):
        (tmp_path / name).write_bytes(data)
        source = check_archive(tmp_path / name, name)
        listed = [
            (m.name.removeprefix("./"), m.metadata, m.reject and m.reject[0])
            for m in members_of(source, settings)
        ]
        assert listed == [
            ("a/1.png", {"label": "one"}, None),
            ("c/3.png", {"label": "three"}, None),
            ("not/there.png", {}, "missing_member"),
        ], name
        assert count(source, settings) == 3


def test_manifest_rows_with_deep_json_infinite_numbers_or_nul_are_rejected_per_row() -> None:
    deep = '{"path": "a.png", "x": ' + "[" * 100_000 + "]" * 100_000 + "}"
    rows = parse_manifest(
        "\n".join(
            [
                deep,
                '{"path": "b.png", "w": 1e999}',
                '{"path": "c.png", "n": "a\\u0000b"}',
                '{"path": "d.png"}',
            ]
        ).encode(),
        name="m.jsonl",
    )
    assert [r.path for r in rows] == [None, None, None, "d.png"]
    assert all(r.error for r in rows[:3])


def test_a_csv_manifest_field_over_the_csv_limit_is_a_422() -> None:
    with pytest.raises(InvalidRequest):
        parse_manifest(("path,label\n" + "a.png," + "x" * 200_000 + "\n").encode(), name="m.csv")
