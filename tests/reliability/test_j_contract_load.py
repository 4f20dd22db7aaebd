"""J. Contract fuzzing and load (scenarios 68-70 of ../shared/RELIABILITY.md).

68: schemathesis generates requests for every operation of the OpenAPI document and checks each
response against it (no 5xx; status, content type and body as declared, problem+json errors
included). 69: locust drives a live server at concurrency 16 for 60 s (benchmarks/locustfile.py).
70: a soak of index / delete / restart cycles with the recall and count invariants checked.
"""

from __future__ import annotations

import csv
import io
import json
import os
import socket
import struct
import subprocess
import sys
import time
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import schemathesis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image
from schemathesis.engine import Status, events
from schemathesis.python.asgi import shutdown_lifespans
from sqlalchemy import create_engine, func, select
from sqlalchemy.orm import Session

from app.core.settings import Settings
from app.data.records import CollectionRecord, EmbeddingRecord, ImageRecord
from app.ingest.sources.datasets import MNIST_FILES
from app.main import create_app
from tests.liveserver import ROOT, LiveServer, run_in_sqlite_pass_only

COLLECTION = "shapes"
PROBLEM = "application/problem+json"
SEEDED_IMAGES = 12


def png(seed: int, *, size: tuple[int, int] = (32, 32)) -> bytes:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


# -- 68: schemathesis over the whole OpenAPI document ------------------------------------------------

CHECKS = [
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
]
MAX_EXAMPLES = 25  # per operation in the fuzzing phase; the coverage phase adds its own cases


def write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def tiny_mnist(folder: Path) -> Path:
    """A 20 + 10 image MNIST in IDX files: dataset imports and evaluations run for real, in
    milliseconds, and nothing is ever downloaded."""
    rng = np.random.default_rng(0)
    (folder / "mnist").mkdir(parents=True)
    for (images, labels), n in zip(MNIST_FILES.values(), (20, 10), strict=True):
        write_idx(folder / "mnist" / images, rng.integers(0, 256, size=(n, 28, 28)))
        write_idx(folder / "mnist" / labels, np.arange(n) % 10)
    return folder


def contract_settings(settings: Settings, tmp_path: Path) -> Settings:
    """The test settings with nothing that reaches outside the data folder: no import roots (folder
    and manifest imports answer 403), URL imports off, no weights downloads, a tiny local MNIST."""
    off = {
        "import_roots": "",
        "url_import_enabled": False,
        "datasets_dir": tiny_mnist(tmp_path / "datasets"),
        "weights_dir": tmp_path / "no-weights",
        "weights_download": False,
    }
    return settings.model_copy(update={k: v for k, v in off.items() if k in Settings.model_fields})


def seed_collection(app: FastAPI) -> None:
    with TestClient(app) as client:
        response = client.post("/api/v1/collections", json={"name": COLLECTION, "embedder": "tiny"})
        assert response.status_code == 201, response.text
        for seed in range(SEEDED_IMAGES):
            response = client.post(
                f"/api/v1/collections/{COLLECTION}/images",
                files={"file": (f"{seed}.png", png(seed), "image/png")},
                data={"metadata": json.dumps({"label": str(seed % 10)})},
            )
            assert response.status_code == 201, response.text


def steer_to_seeded(context: Any, path_parameters: dict[str, Any] | None) -> dict[str, Any] | None:
    """Point three generated cases in four at the seeded collection and images (random names meet
    only 404s); never a DELETE, which would empty the collection for the cases after it."""
    operation = context.operation
    if not path_parameters or operation is None or operation.method.upper() == "DELETE":
        return path_parameters
    pick = zlib.crc32(repr(sorted(path_parameters.items())).encode())
    if pick % 4:
        if "name" in path_parameters:
            path_parameters["name"] = COLLECTION
        if "image_id" in path_parameters:
            path_parameters["image_id"] = 1 + pick % (SEEDED_IMAGES + 2)
    return path_parameters


@dataclass
class ContractRun:
    cases: int = 0
    by_phase: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    stop_reason: str = ""


def run_contract(app: FastAPI) -> ContractRun:
    """Every phase of schemathesis (examples, coverage, fuzzing, stateful) in process against
    ``app``, derandomised; a case fails on a 5xx, an undeclared status, content type or header,
    or a body that does not match its declared schema, error bodies included."""
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    config = schema.config
    config.seed = 68
    config.generation.update(max_examples=MAX_EXAMPLES, deterministic=True, database="none")
    config.checks.update(included_check_names=CHECKS)
    schema.hook("map_path_parameters")(steer_to_seeded)
    run = ContractRun()
    for event in schemathesis.engine.from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            recorder = event.recorder
            run.cases += len(recorder.cases)
            run.by_phase[event.phase.value] = run.by_phase.get(event.phase.value, 0) + len(recorder.cases)
            for case_id, checks in recorder.checks.items():
                for check in checks:
                    if check.status != Status.SUCCESS:
                        case = recorder.cases[case_id].value
                        failure = check.failure_info.failure if check.failure_info else check.status
                        run.failures.append(f"{check.name}: {failure}\n  {case.as_curl_command()[:300]}")
        elif isinstance(event, events.NonFatalError):  # an exception escaped the app: a 500
            run.failures.append(f"{event.label}: {event.value!r}")
        elif isinstance(event, events.FatalError):
            run.failures.append(f"schemathesis stopped: {event.exception!r}")
        elif isinstance(event, events.EngineFinished):
            run.stop_reason = event.stop_reason.value
    return run


def test_r68_openapi_declares_problem_json_errors_on_every_operation(settings: Settings) -> None:
    document = create_app(settings).openapi()
    assert "HTTPValidationError" not in json.dumps(document)  # FastAPI's 422 body, never sent
    operations = [
        (f"{method.upper()} {path}", operation)
        for path, item in document["paths"].items()
        for method, operation in item.items()
    ]
    assert len(operations) > 30
    for label, operation in operations:
        errors = {status: r for status, r in operation["responses"].items() if status[0] in "45"}
        assert {"401", "403", "429", "503"} <= errors.keys(), label
        for status, response in errors.items():
            assert response["content"] == {PROBLEM: {"schema": {"$ref": "#/components/schemas/Problem"}}}, (
                label,
                status,
            )
        if "{" in label:
            assert "404" in errors, label
    problem = document["components"]["schemas"]["Problem"]
    assert {"type", "title", "status", "detail", "code"} <= problem["properties"].keys()


@pytest.mark.slow  # about 35 s on an idle 2-core box, 80 s on a busy one
@pytest.mark.timeout(600)
def test_r68_every_operation_meets_its_openapi_contract(
    settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    safe = contract_settings(settings, tmp_path)
    seed_collection(create_app(safe))
    app = create_app(safe)
    connections: list[object] = []  # the app is called in process: any socket connect is the app's

    def no_network(self: socket.socket, address: object) -> None:
        connections.append(address)
        raise OSError("the contract test allows no network access")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    try:
        run = run_contract(app)
    finally:
        shutdown_lifespans()  # schemathesis keeps the app's lifespan open until asked
    print(f"schemathesis: {run.cases} cases {run.by_phase}, {len(run.failures)} failures")
    assert run.stop_reason == "completed"
    assert connections == []
    assert not run.failures, "\n".join(dict.fromkeys(run.failures))  # each distinct failure once
    assert run.cases >= 30 * MAX_EXAMPLES, run.by_phase  # every operation was really exercised
    assert "unhandled error" not in caplog.text


# -- live server helpers (69, 70) --------------------------------------------------------------------

LIVE_ENV = {
    "CBIR_DEFAULT_EMBEDDER": "tiny",
    "CBIR_IMPORT_PROCESSES": "false",  # decode in threads: one server process to measure
    "CBIR_URL_IMPORT_ENABLED": "false",
}


def zip_of_images(seeds: range) -> bytes:
    """PNGs in label folders (label = seed % 10), as a zip archive for a bulk import."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for seed in seeds:
            archive.writestr(f"{seed % 10}/img-{seed:06d}.png", png(seed))
    return out.getvalue()


def bulk_import(server: LiveServer, collection: str, seeds: range) -> dict[str, Any]:
    """Import the images of ``seeds`` in one job and wait for it; the finished job."""
    files = {"file": ("batch.zip", zip_of_images(seeds), "application/zip")}
    response = server.api("POST", f"/collections/{collection}/imports", files=files)
    assert response.status_code == 202, response.text
    job_id = response.json()["job_id"]
    deadline = time.monotonic() + 120
    while (job := server.api("GET", f"/jobs/{job_id}").json())["state"] not in ("succeeded", "failed"):
        assert time.monotonic() < deadline, f"import job still {job['state']}:\n{server.tail()}"
        time.sleep(0.1)
    assert job["state"] == "succeeded" and job["added"] == len(seeds), job
    return job


def assert_clean_log(server: LiveServer) -> None:
    log = server.tail(200_000)
    assert "Traceback" not in log and "unhandled error" not in log, log[-5000:]


@pytest.fixture
def live(tmp_path: Path) -> Iterator[LiveServer]:
    run_in_sqlite_pass_only()
    server = LiveServer(tmp_path / "data", tmp_path / "server.log", env=LIVE_ENV)
    try:
        yield server.start()
    finally:
        server.stop()


# -- 69: load at concurrency 16 ----------------------------------------------------------------------

LOCUSTFILE = ROOT / "benchmarks" / "locustfile.py"
LOAD_IMAGES = 300


def stats_rows(csv_path: Path) -> dict[str, dict[str, str]]:
    with open(csv_path, newline="") as handle:
        return {row["Name"]: row for row in csv.DictReader(handle)}


@pytest.mark.load
@pytest.mark.slow
@pytest.mark.timeout(420)
def test_r69_search_heavy_load_at_concurrency_16_holds(live: LiveServer, tmp_path: Path) -> None:
    assert live.api("POST", "/collections", json={"name": "load", "embedder": "tiny"}).status_code == 201
    bulk_import(live, "load", range(LOAD_IMAGES))
    for seed in range(20):  # warm the server up: the RSS baseline is a served, not a fresh, process
        query = {"file": ("q.png", png(seed), "image/png")}
        assert live.api("POST", "/collections/load/search", files=query).status_code == 200
    assert live.process is not None
    out, summary = tmp_path / "load", tmp_path / "load-summary.json"
    env = {
        **os.environ,
        "CBIR_LOAD_COLLECTION": "load",
        "CBIR_LOAD_SERVER_PID": str(live.process.pid),
        "CBIR_LOAD_SUMMARY": str(summary),
    }
    # A subprocess: locust monkey-patches the standard library with gevent on import.
    command = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "-u", "16", "-r", "4"]
    command += ["-t", "60s", "--host", live.url, "--csv", str(out), "--only-summary", "--loglevel", "WARNING"]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    report = f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    figures = json.loads(summary.read_text())
    print("load:", json.dumps(figures))
    assert result.returncode == 0, report
    assert figures["reasons"] == [] and figures["server_errors"] == 0, figures

    rows = stats_rows(out.with_name("load_stats.csv"))
    total, search = rows["Aggregated"], rows["search"]
    assert int(total["Request Count"]) > 16 * 10, "the run did not get going"
    assert int(total["Failure Count"]) <= 0.01 * int(total["Request Count"]), total
    assert int(search["Request Count"]) > 0.6 * int(total["Request Count"]), rows.keys()
    assert float(search["95%"]) <= figures["p95_budget_ms"], search
    assert {"upload", "browse"} <= rows.keys()
    assert_clean_log(live)


# -- 70: soak with the recall and count invariants -----------------------------------------------------

SOAK_CYCLES = 10
RECALL_QUERIES = 20


def stored_vectors(data_dir: Path, collection: str) -> tuple[np.ndarray, np.ndarray, int]:
    """The collection's served vectors straight from the database: ids (n,) int64, vectors (n, d)
    float32, and its image row count."""
    url = Settings(data_dir=data_dir, database_url=os.environ.get("CBIR_TEST_SERVER_DATABASE_URL", ""))
    engine = create_engine(url.sqlalchemy_url)
    try:
        with Session(engine) as session:
            record = session.scalars(select(CollectionRecord).filter_by(name=collection)).one()
            rows = session.execute(
                select(EmbeddingRecord.image_id, EmbeddingRecord.vector)
                .join(ImageRecord, ImageRecord.id == EmbeddingRecord.image_id)
                .where(ImageRecord.collection_id == record.id)
                .where(EmbeddingRecord.embedder_version == record.embedder_version)
                .order_by(EmbeddingRecord.image_id)
            ).all()
            images = session.scalar(
                select(func.count()).select_from(ImageRecord).where(ImageRecord.collection_id == record.id)
            )
    finally:
        engine.dispose()
    ids = np.array([r[0] for r in rows], dtype=np.int64)
    vectors = np.stack([np.frombuffer(r[1], dtype="<f4") for r in rows]).astype(np.float32)
    return ids, vectors, int(images or 0)


def assert_exact_top10(server: LiveServer, collection: str, ids: np.ndarray, vectors: np.ndarray) -> None:
    """The served top 10 of stored images equals brute force over the database's vectors (inner
    product of unit vectors), the query itself left out; only tied scores may swap places."""
    rng = np.random.default_rng(len(ids))
    for position in rng.choice(len(ids), size=min(RECALL_QUERIES, len(ids)), replace=False):
        query_id = int(ids[position])
        response = server.api("GET", f"/collections/{collection}/images/{query_id}/similar", params={"k": 10})
        assert response.status_code == 200, response.text
        served = [hit["id"] for hit in response.json()["hits"]]
        scores = vectors @ vectors[position]
        scores[position] = -np.inf
        exact = ids[np.argsort(-scores, kind="stable")[:10]]
        tenth = np.sort(scores)[-10]
        by_id = dict(zip(ids.tolist(), scores.tolist(), strict=True))
        for hit in set(served) - set(exact.tolist()):
            assert abs(by_id[hit] - tenth) < 1e-5, (query_id, served, exact.tolist())
        assert len(served) == 10


def leftovers(data_dir: Path) -> list[str]:
    """Files that should not outlive the request or job that made them."""
    found = [p for p in data_dir.rglob("*") if p.is_file() and (p.suffix == ".tmp" or "quarantine" in p.name)]
    for folder in ("tmp", "uploads"):
        found += [p for p in (data_dir / folder).rglob("*") if p.is_file()]
    return sorted(str(p.relative_to(data_dir)) for p in found)


def wait_for_no_leftovers(server: LiveServer, *, timeout: float = 10.0) -> bool:
    """True once no leftover files remain (a save in progress may hold a temporary file a moment)."""
    deadline = time.monotonic() + timeout
    while leftovers(server.data_dir):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_r70_soak_of_index_delete_restart_cycles_keeps_invariants(live: LiveServer) -> None:
    collection, rng = "soak", np.random.default_rng(70)
    assert live.api("POST", "/collections", json={"name": collection, "embedder": "tiny"}).status_code == 201
    other_files: list[set[str]] = []
    for cycle in range(SOAK_CYCLES):
        bulk_import(live, collection, range(cycle * 50, cycle * 50 + 50))
        ids, _, _ = stored_vectors(live.data_dir, collection)
        for image_id in rng.choice(ids, size=10, replace=False):
            assert live.api("DELETE", f"/images/{int(image_id)}").status_code == 204
        # Restart: a clean stop on even cycles, kill -9 on odd ones.
        if cycle % 2:
            live.kill()
        else:
            live.stop()
        live.start()

        ids, vectors, images = stored_vectors(live.data_dir, collection)
        assert images == len(ids) == 40 * (cycle + 1)
        index = live.api("GET", f"/collections/{collection}/index").json()
        assert index["state"] == "ready", index
        assert index["ntotal"] - index["tombstones"] == len(ids), index
        assert index["high_water_mark"] >= ids.max(), index
        assert_exact_top10(live, collection, ids, vectors)

        stored = [p for p in (live.data_dir / "images").rglob("*") if p.is_file()]
        assert len(stored) == len(ids), "image files without a row, or rows without their file"
        assert wait_for_no_leftovers(live), f"cycle {cycle}: {leftovers(live.data_dir)}"
        journals = list((live.data_dir / "journal").glob("*"))
        assert len(journals) <= 1, f"only the live server's own journal may remain: {journals}"
        # Import reports (reports/<job>.jsonl) are the jobs' history, one per job by design.
        other_files.append(
            {str(p.relative_to(live.data_dir)) for p in live.data_dir.rglob("*") if p.is_file()}
            - {str(p.relative_to(live.data_dir)) for p in stored}
            - {str(p.relative_to(live.data_dir)) for p in (live.data_dir / "reports").glob("*.jsonl")}
        )
    grown = sorted(other_files[-1] - other_files[0])
    assert len(other_files[-1]) <= len(other_files[0]), f"files outside images/ accumulate: {grown}"
    assert_clean_log(live)
