"""Photo collections search with the best measured configuration by default: the default spec of
efficientnet_lite0, whitening fitted by itself from a threshold, and validation of each step."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.catalog.collections import create_collection, get_collection
from app.context import AppContext, open_context
from app.core.settings import Settings
from app.ingest import jobs
from app.ingest.sources.folder import check_folder
from app.learning import autotune
from app.learning import groundtruth as gt
from app.learning.job_kinds import job_runner
from app.main import create_app
from models import cnn, registry
from tests.holidays import holidays_subset

# A small input keeps the real network fast; everything else is the default (whole image, R-MAC).
SMALL = "efficientnet_lite0:sizes=96"
# The key the former default (a bare "efficientnet_lite0") hashed into its version.
LEGACY_KEY = "layer=head,pooling=avg,p=3,input=crop,sizes=,flip=0"
GROUPS = tuple(range(1000, 1012))  # 12 Holidays groups: 12 queries, 29 images


# -- the default spec ----------------------------------------------------------------------------------
def test_efficientnet_lite0_alone_means_whole_image_288_rmac() -> None:
    embedder = registry.create("efficientnet_lite0", download=False)
    assert isinstance(embedder, cnn.CNNEmbedder)
    assert (embedder.options.input, embedder.options.sizes, embedder.options.pooling) == (
        "whole",
        (288,),
        "rmac",
    )
    assert registry.canonical("efficientnet_lite0:input=whole,pooling=rmac,sizes=288") == "efficientnet_lite0"


def test_the_former_default_keeps_its_options_under_its_explicit_spelling() -> None:
    legacy = registry.create("efficientnet_lite0:input=crop,pooling=avg", download=False)
    assert isinstance(legacy, cnn.CNNEmbedder)
    assert legacy.options.key() == LEGACY_KEY
    assert (
        registry.canonical("efficientnet_lite0:input=crop,pooling=avg")
        == "efficientnet_lite0:input=crop,pooling=avg"
    )
    # input=whole without sizes used the weights' resize side: spelt sizes=native now
    native = registry.create("efficientnet_lite0:pooling=avg,sizes=native", download=False)
    assert isinstance(native, cnn.CNNEmbedder)
    assert native.options.key() == "layer=head,pooling=avg,p=3,input=whole,sizes=,flip=0"


def test_other_networks_keep_their_centre_crop_default() -> None:
    options = cnn.parse_options(cnn.ARCHS["resnet50"], {})
    assert (options.input, options.sizes, options.pooling) == ("crop", (), "avg")


# -- decide(): each step kept only where it helps the validation -----------------------------------------
def groups_of(n_groups: int, size: int) -> autotune.Validation:
    """Every image a query; relevant: the other images of its group (rows in group order)."""
    rows = np.arange(n_groups * size, dtype=np.int64)
    relevant = [
        np.asarray([r for r in range(g * size, (g + 1) * size) if r != q])
        for g in range(n_groups)
        for q in range(g * size, (g + 1) * size)
    ]
    return autotune.Validation("labels", rows, rows.copy(), relevant)


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_whitening_is_kept_where_it_removes_a_dominant_nuisance() -> None:
    rng = np.random.default_rng(0)
    n_groups, size, d = 40, 5, 64
    centres = rng.normal(size=(n_groups, d)).repeat(size, axis=0)
    # a few high-variance directions unrelated to the groups swamp the cosine of the raw codes
    nuisance = np.zeros((n_groups * size, d))
    nuisance[:, :4] = rng.normal(scale=6.0, size=(n_groups * size, 4))
    raw = unit(centres + nuisance + rng.normal(scale=0.3, size=(n_groups * size, d)))
    decision = autotune.decide(raw, validation=groups_of(n_groups, size), dim=32)
    plain, white, expanded = (row["map_all"] for row in decision.table)
    assert white > plain + 0.1 and decision.whitening
    assert decision.qe == (expanded > white)


def test_whitening_is_switched_off_where_it_blows_up_noise() -> None:
    rng = np.random.default_rng(1)
    n_groups, size, d = 40, 5, 64
    # the groups differ in 4 strong directions; the other 60 hold only faint noise, which a
    # whitening scales up to the same weight
    signal = np.zeros((n_groups, d))
    signal[:, :4] = rng.normal(scale=5.0, size=(n_groups, 4))
    raw = unit(signal.repeat(size, axis=0) + rng.normal(scale=0.5, size=(n_groups * size, d)))
    decision = autotune.decide(raw, validation=groups_of(n_groups, size), dim=64)
    plain, white, expanded = (row["map_all"] for row in decision.table)
    assert white < plain and not decision.whitening
    assert decision.table[2]["whiten"] == 0  # QE is then measured on the plain codes
    assert decision.qe == (expanded > plain)
    assert decision.reasons["whitening"].startswith("off")


def test_without_a_validation_whitening_is_on_and_qe_off() -> None:
    decision = autotune.decide(np.eye(4, dtype=np.float32), validation=None, dim=4)
    assert decision.whitening and not decision.qe and decision.table == []


# -- the policy after an import, with the real network on real photos -------------------------------------
def context(settings: Settings, *, threshold: int) -> AppContext:
    return open_context(settings.model_copy(update={"autotune_min_images": threshold, "torch_threads": 2}))


def import_folder(ctx: AppContext, *, collection: str, folder: Path) -> None:
    runner = job_runner(ctx)
    source = check_folder(folder)
    job_id = runner.create_job(collection=collection, source=source)
    runner.run_import(job_id=job_id, collection=collection, source=source)
    assert jobs.get_job(ctx, job_id).record.state == "succeeded"


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list[str]]]:
    """12 Holidays groups in the Holidays layout (groundtruth.json beside the images)."""
    folder = tmp_path_factory.mktemp("holidays") / "jpg"
    truth = holidays_subset(folder, GROUPS)
    (folder / "groundtruth.json").write_text(json.dumps(truth))
    return folder, truth


@pytest.fixture
def tuned(settings: Settings, photos: tuple[Path, dict[str, list[str]]]) -> Iterator[AppContext]:
    ctx = context(settings, threshold=20)
    create_collection(ctx, name="photos", embedder=SMALL)
    import_folder(ctx, collection="photos", folder=photos[0])
    yield ctx
    ctx.close()


def test_a_labelled_collection_at_the_threshold_is_tuned_and_validated(
    tuned: AppContext, photos: tuple[Path, dict[str, list[str]]]
) -> None:
    info = get_collection(tuned, "photos")
    tuning = info.tuning
    assert tuning is not None and tuning["state"] == "tuned" and tuning["validated"]
    assert tuning["validation"] == {"source": "labels", "queries": len(photos[1])}
    n = info.image_count
    assert tuning["fitted_on"] == n == info.embedded_count and n >= 20
    whitening, qe = tuning["steps"]
    assert [row["setting"] for row in tuning["table"]][:2] == ["plain", f"whiten{n}"]
    # what is served is what was decided
    assert info.whitening == (n if whitening["on"] else None)
    assert info.search_options["qe"] == (2 if qe["on"] else 0)
    # and `cbir eval --groundtruth` with no option measures exactly that (as served)
    (row,) = gt.evaluate_with_groundtruth(tuned, collection="photos", groundtruth=photos[1])
    served = tuning["table"][2] if qe["on"] else tuning["table"][1 if whitening["on"] else 0]
    assert row["as_served"] and row["map_all"] == served["map_all"]
    assert (row["whiten"], row["qe"]) == (info.whitening or 0, info.search_options["qe"])


def test_the_tuning_is_shown_and_switched_through_the_api(
    tuned: AppContext, photos: tuple[Path, dict[str, list[str]]]
) -> None:
    settings = tuned.settings
    (served,) = gt.evaluate_with_groundtruth(tuned, collection="photos", groundtruth=photos[1])
    tuned.close()
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        body = client.get("/api/v1/collections/photos").json()
        assert body["tuning"]["auto"] and body["tuning"]["validated"] and len(body["tuning"]["table"]) == 3
        # the API's evaluation with no whiten is the collection as served too
        evaluated = client.post("/api/v1/collections/photos/evaluate", json={"groundtruth": photos[1]})
        assert evaluated.status_code == 200, evaluated.text
        (row,) = evaluated.json()["results"]
        assert (row["whiten"], row["qe"], row["map_all"]) == (
            served["whiten"],
            served["qe"],
            served["map_all"],
        )
        off = client.put("/api/v1/collections/photos/tuning", json={"auto": False})
        assert off.status_code == 200 and off.json()["tuning"]["auto"] is False
        assert client.put("/api/v1/collections/photos/tuning", json={"auto": "maybe"}).status_code == 422


@pytest.mark.parametrize(("threshold", "state"), [(29, "tuned"), (30, "waiting")])
def test_the_tuning_fires_at_the_threshold_and_not_below(
    settings: Settings, photos: tuple[Path, dict[str, list[str]]], threshold: int, state: str
) -> None:
    ctx = context(settings, threshold=threshold)
    try:
        create_collection(ctx, name="photos", embedder=SMALL)
        import_folder(ctx, collection="photos", folder=photos[0])
        info = get_collection(ctx, "photos")
        assert info.image_count == 29
        assert info.tuning is not None and info.tuning["state"] == state
        assert info.tuning["fitted_on"] == (29 if state == "tuned" else None)
        if state == "waiting":
            assert info.whitening is None and info.search_options["qe"] == 0
    finally:
        ctx.close()


def unlabelled_copy(folder: Path, tmp_path: Path) -> Path:
    """The photos without the Holidays layout's ground truth: a folder of JPEGs, no labels."""
    plain = tmp_path / "plain"
    plain.mkdir()
    for image in folder.glob("*.jpg"):
        shutil.copyfile(image, plain / image.name)
    return plain


def test_an_unlabelled_collection_is_whitened_but_not_validated(
    settings: Settings, photos: tuple[Path, dict[str, list[str]]], tmp_path: Path
) -> None:
    plain = unlabelled_copy(photos[0], tmp_path)
    ctx = context(settings, threshold=20)
    try:
        create_collection(ctx, name="photos", embedder=SMALL)
        import_folder(ctx, collection="photos", folder=plain)
        info = get_collection(ctx, "photos")
        tuning = info.tuning
        assert tuning is not None and tuning["validated"] is False and tuning["table"] == []
        assert [(s["step"], s["on"], s["validated"]) for s in tuning["steps"]] == [
            ("whitening", True, False),
            ("qe", False, False),
        ]
        assert info.whitening == info.image_count and info.search_options["qe"] == 0
    finally:
        ctx.close()


def test_switched_off_the_collection_is_left_alone(
    settings: Settings, photos: tuple[Path, dict[str, list[str]]]
) -> None:
    ctx = context(settings, threshold=20)
    try:
        create_collection(ctx, name="photos", embedder=SMALL)
        autotune.set_autotune(ctx, collection="photos", on=False)
        import_folder(ctx, collection="photos", folder=photos[0])
        info = get_collection(ctx, "photos")
        assert info.whitening is None and info.tuning is not None and info.tuning["state"] == "waiting"
    finally:
        ctx.close()


def test_an_embedder_that_is_no_pretrained_cnn_is_never_tuned(settings: Settings) -> None:
    ctx = context(settings, threshold=2)
    try:
        create_collection(ctx, name="thumbs", embedder="tiny")
        tuning = get_collection(ctx, "thumbs").tuning
        assert tuning is not None and tuning["state"] == "not_applicable"
        assert autotune.after_import(ctx, collection="thumbs") is None
    finally:
        ctx.close()


def test_the_whitening_is_fitted_again_once_the_collection_has_doubled(
    settings: Settings, photos: tuple[Path, dict[str, list[str]]], tmp_path: Path
) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    truth = photos[1]
    for folder, groups in ((first, GROUPS[:5]), (second, GROUPS[5:])):
        part = {q: r for q, r in truth.items() if int(q[:4]) in groups}
        folder.mkdir()
        for name in [*part, *(n for names in part.values() for n in names)]:
            shutil.copyfile(photos[0] / name, folder / name)
        (folder / "groundtruth.json").write_text(json.dumps(part))
    ctx = context(settings, threshold=5)
    try:
        create_collection(ctx, name="photos", embedder=SMALL)
        import_folder(ctx, collection="photos", folder=first)
        fitted = get_collection(ctx, "photos").tuning["fitted_on"]  # type: ignore[index]
        assert fitted == get_collection(ctx, "photos").image_count
        import_folder(ctx, collection="photos", folder=second)
        info = get_collection(ctx, "photos")
        assert info.image_count >= 2 * fitted
        assert info.tuning is not None and info.tuning["fitted_on"] == info.image_count
        # served codes are consistent with the last decision, whichever it was
        assert info.whitening == (info.tuning["steps"][0]["dim"] if info.tuning["steps"][0]["on"] else None)
        assert info.embedded_count == info.image_count
    finally:
        ctx.close()


def test_the_record_says_outdated_once_the_collection_serves_other_codes(tuned: AppContext) -> None:
    from app.learning.tuning import whiten_collection

    whiten_collection(tuned, collection="photos", dim=8)  # by hand, over whatever was tuned
    tuning = get_collection(tuned, "photos").tuning
    assert tuning is not None and tuning["state"] == "outdated"


def test_cbir_collections_tune_shows_switches_and_refuses_cleanly(settings: Settings) -> None:
    from click.testing import CliRunner

    from app.cli import main
    from app.core.settings import get_settings

    env = {"CBIR_DATA_DIR": str(settings.data_dir), "CBIR_DATABASE_URL": settings.database_url}

    def cbir(*args: str) -> tuple[int, str]:
        get_settings.cache_clear()
        try:
            result = CliRunner().invoke(main, list(args), env=env)
        finally:
            get_settings.cache_clear()
        return result.exit_code, result.output

    assert cbir("collections", "create", "thumbs", "--embedder", "tiny")[0] == 0
    code, output = cbir("collections", "tune", "thumbs", "--auto", "off")
    assert code == 0 and json.loads(output)["auto"] is False
    code, output = cbir("collections", "tune", "thumbs", "--now")
    assert code == 1 and "pretrained CNN embedders, not 'tiny'" in output and "Traceback" not in output
    code, output = cbir("collections", "tune", "thumbs", "--groundtruth", __file__)
    assert code == 2 and "--groundtruth goes with --now" in output


def test_a_qe_set_by_hand_is_kept_by_the_tuning(
    settings: Settings, photos: tuple[Path, dict[str, list[str]]], tmp_path: Path
) -> None:
    from app.learning.tuning import set_search_options

    plain = unlabelled_copy(photos[0], tmp_path)
    ctx = context(settings, threshold=20)
    try:
        create_collection(ctx, name="photos", embedder=SMALL)
        set_search_options(ctx, collection="photos", qe=3, qe_alpha=2.0)
        import_folder(ctx, collection="photos", folder=plain)  # unlabelled: QE would be switched off
        info = get_collection(ctx, "photos")
        assert info.search_options["qe"] == 3 and info.search_options["qe_alpha"] == 2.0
        qe_step = info.tuning["steps"][1]
        assert qe_step["on"] is True and qe_step["reason"].startswith("set by hand (qe 3), kept")
        assert info.whitening == info.image_count  # the whitening is still tuned
    finally:
        ctx.close()
