"""How fast a large compressed tar is accepted, and what its import costs.

Writes a tar.gz of ``--members`` members of 19 MiB zeros (a few MB on disk; each member is over the
member cap, so none is decoded), uploads it to a scratch service in process (SQLite, ``tiny``)
with ``CBIR_MAX_TOTAL_UNCOMPRESSED`` set to ``--cap-mib``, and measures the seconds to the 202, the
seconds and CPU-seconds to the job's end, and the report lines against the job's ``total``.

    python benchmarks/archive_accept.py [--members 80] [--cap-mib 1024] [--json]

With ``--json`` the last line is one JSON object: {"archive_bytes", "members", "cap_mib",
"seconds_to_202", "seconds_to_end", "cpu_seconds", "total", "done", "report_lines", "state"}.
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastapi.testclient import TestClient  # noqa: E402

from app.core.settings import Settings  # noqa: E402
from app.main import create_app  # noqa: E402

MEMBER_BYTES = 19 * 2**20


class Zeros(io.RawIOBase):
    """``n`` zero bytes, read without holding them."""

    def __init__(self, n: int) -> None:
        self.left = n

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        n = min(len(buffer), self.left)
        buffer[:n] = bytes(n)
        self.left -= n
        return n


def write_archive(path: Path, *, members: int) -> bytes:
    with tarfile.open(path, "w:gz", compresslevel=6) as archive:
        for i in range(members):
            info = tarfile.TarInfo(f"zeros/{i:05d}.raw")
            info.size = MEMBER_BYTES
            archive.addfile(info, Zeros(MEMBER_BYTES))
    return path.read_bytes()


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(*, members: int, cap_mib: int) -> dict[str, object]:
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="cbir-archive-"))
    data = write_archive(tmp / "zeros.tar.gz", members=members)
    settings = Settings(
        data_dir=tmp / "data",
        database_url=f"sqlite:///{tmp}/db.sqlite",
        default_embedder="tiny",
        import_processes=False,
        max_total_uncompressed=cap_mib * 2**20,
        max_archive_bytes=100 * 2**20,
    )
    with TestClient(create_app(settings)) as client:
        client.post("/api/v1/collections", json={"name": "z", "embedder": "tiny"})
        cpu0, t0 = cpu_seconds(), time.monotonic()
        files = {"file": ("z.tar.gz", data, "application/octet-stream")}
        response = client.post("/api/v1/collections/z/imports", files=files)
        to_202 = time.monotonic() - t0
        job_id = response.json()["job_id"]
        while (job := client.get(f"/api/v1/jobs/{job_id}").json())["state"] not in ("succeeded", "failed"):
            time.sleep(0.2)
        to_end, cpu = time.monotonic() - t0, cpu_seconds() - cpu0
        lines = client.get(f"/api/v1/jobs/{job_id}/report").text.splitlines()
    return {
        "archive_bytes": len(data),
        "members": members,
        "cap_mib": cap_mib,
        "seconds_to_202": round(to_202, 2),
        "seconds_to_end": round(to_end, 1),
        "cpu_seconds": round(cpu, 1),
        "total": job["total"],
        "done": job["done"],
        "report_lines": len(lines),
        "state": job["state"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=80)
    parser.add_argument("--cap-mib", type=int, default=1024, help="CBIR_MAX_TOTAL_UNCOMPRESSED in MiB")
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    args = parser.parse_args()
    result = measure(members=args.members, cap_mib=args.cap_mib)
    for key, value in result.items():
        print(f"{key:>16}  {value}")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
