"""Ray Serve application against the single-image FastAPI baseline, side by side in one run.

    python bench/serving.py [--seconds 15] [--concurrency 1 8 32]

Starts `serve run` on conf/serve.yaml as configured (a local Ray started with conf/serve.env) and
`uvicorn bench.baseline_app:app`, then drives each with closed-loop clients at each concurrency
(8 per load-generating process), each cycling through the bundled faces of every class (as 48x48
faces, and resized into 640x480 photos: how many get the mirrored second pass depends on the
face), and prints requests/s, p50 and p99 latency and ratios. A third server, `bench.noop_app`
(Serve with no model), shows what Serve's own request path allows on this machine.
"""

import argparse
import asyncio
import io
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import yaml
from PIL import Image

from serve.environment import serving_env

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


FACES = sorted((ROOT / "examples" / "faces").glob("*/*.jpg"))


def photo(face: Path, width: int = 640, height: int = 480) -> bytes:
    buffer = io.BytesIO()
    Image.open(face).convert("RGB").resize((width, height)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


# Closed-loop clients per load-generating process. One asyncio + httpx process driving 32 requests
# at once manages only about 150 requests/s against a server that answers 490/s when the same 32
# come from four processes of 8: a single client process, not the server, set the old figures.
CLIENTS_PER_PROCESS = 8


async def _clients(url: str, images: list[bytes], concurrency: int, seconds: float) -> tuple[list[float], int, float]:
    latencies: list[float] = []
    failures = 0
    deadline = time.perf_counter() + seconds

    async def client_loop(client: httpx.AsyncClient, offset: int) -> None:
        nonlocal failures
        sent = offset
        while time.perf_counter() < deadline:
            image, sent = images[sent % len(images)], sent + 1
            started = time.perf_counter()
            response = await client.post(url, files={"file": ("f.jpg", image, "image/jpeg")})
            if response.status_code == 200:
                latencies.append(time.perf_counter() - started)
            else:
                failures += 1

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(client, i) for i in range(concurrency)))
        elapsed = time.perf_counter() - started
    return latencies, failures, elapsed


def _client_process(args: tuple[str, list[bytes], int, float]) -> tuple[list[float], int, float]:
    return asyncio.run(_clients(*args))


def drive(url: str, images: list[bytes], concurrency: int, seconds: float) -> tuple[float, float, float, int]:
    """Requests/s, p50 and p99 ms, failures: `concurrency` closed-loop clients over several processes."""
    shares = [CLIENTS_PER_PROCESS] * (concurrency // CLIENTS_PER_PROCESS)
    if concurrency % CLIENTS_PER_PROCESS:
        shares.append(concurrency % CLIENTS_PER_PROCESS)
    with multiprocessing.get_context("spawn").Pool(len(shares)) as pool:
        parts = pool.map(_client_process, [(url, images, share, seconds) for share in shares])
    latencies = [latency for part in parts for latency in part[0]]
    elapsed = max(part[2] for part in parts)
    ms = np.asarray(latencies or [float("nan")]) * 1000
    failures = sum(part[1] for part in parts)
    return len(latencies) / elapsed, float(np.percentile(ms, 50)), float(np.percentile(ms, 99)), failures


def wait_for(url: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            # Serve's proxy answers 404/503 before the application is deployed: wait for a 200.
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"{url} did not come up")


def start(command: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def stop(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGINT)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    args = parser.parse_args()
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", RAY_ADDRESS="local",
               **serving_env())
    config = yaml.safe_load((ROOT / "conf" / "serve.yaml").read_text())
    config["http_options"] = {"host": "127.0.0.1", "port": 8000}
    images = {"48x48 face": [face.read_bytes() for face in FACES],
              "640x480 photo": [photo(face) for face in FACES]}
    results: dict[tuple[str, str, int], tuple[float, float, float, int]] = {}
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", dir=ROOT / "conf") as f:
        yaml.safe_dump(config, f)
        f.flush()
        servers = {
            "serve": (["serve", "run", f.name], "http://127.0.0.1:8000"),
            "baseline": ([str(BIN / "uvicorn"), "bench.baseline_app:app", "--port", "8001", "--log-level", "warning"],
                         "http://127.0.0.1:8001"),
            "serve no-op": (["serve", "run", "bench.noop_app:app"], "http://127.0.0.1:8000"),
        }
        for name, (command, url) in servers.items():
            process = start(command, env)
            try:
                wait_for(url + ("/docs" if name == "baseline" else "/health"))
                for label, image in images.items():
                    drive(url + "/predict", image, 4, 2)
                    for concurrency in args.concurrency:
                        results[name, label, concurrency] = drive(
                            url + "/predict", image, concurrency, args.seconds)
            finally:
                stop(process)
    print(f"{'image':<15}{'conc':>5}{'serve req/s':>13}{'p50 ms':>8}{'p99 ms':>8}"
          f"{'base req/s':>12}{'p50 ms':>8}{'p99 ms':>8}{'req/s ratio':>13}{'p99 ratio':>11}")
    for label in images:
        for concurrency in args.concurrency:
            s, b = results["serve", label, concurrency], results["baseline", label, concurrency]
            print(f"{label:<15}{concurrency:>5}{s[0]:>13.1f}{s[1]:>8.1f}{s[2]:>8.1f}{b[0]:>12.1f}{b[1]:>8.1f}"
                  f"{b[2]:>8.1f}{s[0] / b[0]:>12.2f}x{s[2] / b[2]:>10.2f}x"
                  + (f"  (failures: serve {s[3]}, baseline {b[3]})" if s[3] or b[3] else ""))
    print("\nServe with no model (request path only):")
    for label in images:
        for concurrency in args.concurrency:
            n, b = results["serve no-op", label, concurrency], results["baseline", label, concurrency]
            print(f"{label:<15}{concurrency:>5}{n[0]:>13.1f}{n[1]:>8.1f}{n[2]:>8.1f}   {n[0] / b[0]:.2f}x baseline")


if __name__ == "__main__":
    main()
