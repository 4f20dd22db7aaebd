"""The neural-codes acceptance bar: INRIA Holidays (dev groups), the Holidays protocol, mAP >= 0.87."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from app.context import AppContext, open_context
from app.services import groundtruth as gt
from app.services import jobs
from app.services.collections import create_collection, get_collection
from app.settings import Settings
from tests.holidays import require_holidays

# The best offline configuration measured (README "Neural codes on INRIA Holidays").
BEST = "efficientnet_lite0:input=whole,pooling=rmac,sizes=288"


@pytest.fixture
def ctx(settings: Settings) -> Iterator[AppContext]:
    context = open_context(settings.model_copy(update={"torch_threads": 2}))
    yield context
    context.close()


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_efficientnet_rmac_whitened_codes_reach_the_holidays_bar(ctx: AppContext) -> None:
    root = require_holidays()
    create_collection(ctx, name="holidays", embedder=BEST)
    runner = jobs.JobRunner(ctx)
    source = jobs.check_folder(root / "jpg")
    job_id = runner.create_job(collection="holidays", source=source)
    runner.run_import(job_id=job_id, collection="holidays", source=source)
    info = get_collection(ctx, "holidays")
    assert (info.image_count, info.embedded_count) == (402, 402)  # 3 files repeat other files' bytes

    truth = gt.read_groundtruth(root / "groundtruth.json")
    rows = gt.evaluate_with_groundtruth(
        ctx, collection="holidays", groundtruth=truth, whiten=[0, 128], qe=[0, 2]
    )
    by_setting = {(r["whiten"], r["qe"]): r for r in rows}
    assert all(r["queries"] == 150 and r["database"] == 405 for r in rows)
    assert by_setting[(0, 0)]["map_all"] > 0.8  # the codes alone
    assert by_setting[(128, 2)]["map_all"] >= 0.87, rows
