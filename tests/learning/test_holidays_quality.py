"""The photo acceptance bar, through the CLI as a user runs it: a collection created with
``efficientnet_lite0`` and no options, the INRIA Holidays dev photos imported, and with no further
call ``cbir eval --groundtruth`` (as served) reaches mAP >= 0.88 (the Holidays protocol, 150
queries against the 405 photos). Its figures do not depend on the database, so it runs in the
SQLite pass only (imports and evaluation on PostgreSQL have their own tests there)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result

from app.cli import main
from app.core.settings import get_settings
from tests.conftest import DATASETS_DIR
from tests.holidays import require_holidays


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_a_photo_collection_with_no_options_reaches_the_holidays_bar_as_served(tmp_path: Path) -> None:
    root = require_holidays()
    env = {
        "CBIR_DATA_DIR": str(tmp_path / "data"),
        "CBIR_DATABASE_URL": "",  # SQLite in the data folder
        "CBIR_DATASETS_DIR": str(DATASETS_DIR),
        "CBIR_DEVICE": "cpu",
    }
    threads = torch.get_num_threads()

    def cbir(*args: str) -> Result:
        get_settings.cache_clear()
        try:
            result = CliRunner().invoke(main, list(args), env=env)
        finally:
            get_settings.cache_clear()
            torch.set_num_threads(threads)
        assert result.exit_code == 0, result.output
        return result

    cbir("collections", "create", "holidays", "--embedder", "efficientnet_lite0")
    cbir("import", str(root / "jpg"), "--collection", "holidays")
    result = cbir(
        "eval", "--collection", "holidays", "--groundtruth", str(root / "groundtruth.json"), "--json"
    )
    (row,) = json.loads(result.output.strip().splitlines()[-1])["results"]
    # tuned by the import itself: the folder has no labels, so whitening on, QE off
    assert row["as_served"] and (row["whiten"], row["qe"]) == (128, 0)
    assert row["queries"] == 150 and row["database"] == 405
    assert row["map_all"] >= 0.88, row

    tuning = json.loads(cbir("collections", "tune", "holidays").output)
    assert tuning["fitted_on"] == 402 and tuning["validated"] is False  # 3 files repeat others' bytes
    assert [(s["step"], s["on"]) for s in tuning["steps"]] == [("whitening", True), ("qe", False)]
