"""Peak memory of the server while it decodes large images: one search, then eight at once.

Writes a 16-bit RGBA PNG of ``--side`` x ``--side`` pixels (6324: 40 megapixels, within the default
caps; all zeros, so about 320 KB), starts a real server (uvicorn, SQLite, a scratch data folder),
creates a collection, warms it with a small search, then searches with the large PNG once and
``--concurrent`` times at once. Every 20 ms it samples the server's resident memory (VmRSS);
after each phase it reads the kernel's high-water mark (VmHWM, reset between phases where the
kernel allows it).

    python benchmarks/decode_memory.py [--side 6324] [--concurrent 8] [--embedder efficientnet_lite0]
        [--env CBIR_DECODE_MEMORY_BUDGET_BYTES=1073741824 ...] [--json]

To compare with another version of the service, run this file from that version's checkout (it
needs nothing of the service but ``tests/liveserver.py``). The JSON line (the last line with
``--json``): {"side", "png_bytes", "embedder", "estimate_bytes" (app/imaging/decode_cost.py, null where
absent), "baseline_rss_mb", "single": {...}, "concurrent": {...}} where each phase has
"peak_rss_mb" (the larger of sampled VmRSS and VmHWM), "rise_mb" (over the baseline), "seconds"
(wall time of the phase), "latencies_s" and "statuses".
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
import tempfile
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.liveserver import LiveServer  # noqa: E402

MB = 1024 * 1024


def png16_rgba(side: int) -> bytes:
    """A black, fully transparent 16-bit RGBA PNG, compressed one row at a time."""
    compress = zlib.compressobj(9)
    row = bytes(1 + side * 8)
    idat = b"".join(compress.compress(row) for _ in range(side)) + compress.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", side, side, 16, 6, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def reset_hwm(pid: int) -> bool:
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class Sampler:
    """The largest VmRSS of ``pid`` seen every 20 ms while running."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_kb = max(self.peak_kb, status_kb(self.pid, "VmRSS"))
            time.sleep(0.02)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def estimate(data: bytes) -> int | None:
    try:
        from app.imaging.decode import ImageLimits, plan_decode
    except ImportError:  # a version without decode estimates
        return None
    plan = plan_decode(data, limits=ImageLimits(max_pixels=10**12, max_side=10**6))
    return plan.nbytes if plan is not None else None


def phase(server: LiveServer, pid: int, data: bytes, *, count: int, baseline_kb: int) -> dict[str, object]:
    reset_hwm(pid)
    clients = [httpx.Client(base_url=f"{server.url}/api/v1", timeout=600) for _ in range(count)]
    for client in clients:  # connected before the burst
        client.get("/health")
    start = threading.Barrier(count)

    def send(i: int) -> tuple[float, int]:
        start.wait()
        began = time.perf_counter()
        response = clients[i].post(
            "/collections/bench/search", params={"k": 5}, files={"file": ("big.png", data, "image/png")}
        )
        return time.perf_counter() - began, response.status_code

    began = time.perf_counter()
    with Sampler(pid) as sampler, ThreadPoolExecutor(count) as pool:
        outcomes = list(pool.map(send, range(count)))
    seconds = time.perf_counter() - began
    for client in clients:
        client.close()
    peak_kb = max(sampler.peak_kb, status_kb(pid, "VmHWM"))
    return {
        "peak_rss_mb": round(peak_kb / 1024, 1),
        "rise_mb": round((peak_kb - baseline_kb) / 1024, 1),
        "seconds": round(seconds, 2),
        "latencies_s": [round(s, 2) for s, _ in outcomes],
        "statuses": [code for _, code in outcomes],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=6324)
    parser.add_argument("--concurrent", type=int, default=8)
    parser.add_argument("--embedder", default="efficientnet_lite0")
    parser.add_argument("--env", nargs="*", default=[], metavar="CBIR_X=VALUE", help="server settings")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    data = png16_rgba(args.side)
    env = dict(item.split("=", 1) for item in args.env)
    with tempfile.TemporaryDirectory(prefix="cbir-decode-memory-") as scratch:
        server = LiveServer(Path(scratch) / "data", Path(scratch) / "server.log", env=env).start()
        try:
            assert server.process is not None
            pid = server.process.pid
            created = server.api("POST", "/collections", json={"name": "bench", "embedder": args.embedder})
            assert created.status_code == 201, created.text
            warm = server.api(
                "POST",
                "/collections/bench/search",
                files={"file": ("small.png", png16_rgba(64), "image/png")},
            )
            assert warm.status_code == 200, warm.text
            time.sleep(0.5)
            baseline_kb = status_kb(pid, "VmRSS")
            single = phase(server, pid, data, count=1, baseline_kb=baseline_kb)
            time.sleep(0.5)
            concurrent = phase(server, pid, data, count=args.concurrent, baseline_kb=baseline_kb)
        finally:
            server.stop()
    result = {
        "side": args.side,
        "png_bytes": len(data),
        "embedder": args.embedder,
        "env": env,
        "estimate_bytes": estimate(data),
        "baseline_rss_mb": round(baseline_kb / 1024, 1),
        "single": single,
        "concurrent": concurrent,
    }
    print(f"{args.side}x{args.side} 16-bit RGBA PNG, {len(data) / 1024:.0f} KB; embedder {args.embedder}")
    print(f"estimated decode peak: {result['estimate_bytes']} bytes; baseline {result['baseline_rss_mb']} MB")
    for name, figures in (("one search", single), (f"{args.concurrent} at once", concurrent)):
        print(
            f"{name}: peak {figures['peak_rss_mb']} MB (+{figures['rise_mb']} MB) in {figures['seconds']} s; "
            f"statuses {figures['statuses']}; latencies {figures['latencies_s']} s"
        )
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
