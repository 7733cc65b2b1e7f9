"""Ray Serve application against the single-image FastAPI baseline, side by side in one run.

    python bench/serving.py [--seconds 15] [--concurrency 1 8 32]

Starts `serve run` on conf/serve.yaml as configured (a local Ray started with conf/serve.env) and
`uvicorn bench.baseline_app:app`, then drives each with closed-loop clients at each concurrency
(lean HTTP/1.1 keep-alive clients in this process, see `closed_loop`), each cycling through the
bundled faces of every class (as 48x48 faces, and resized into 640x480 photos: how many get the
mirrored second pass depends on the face; both servers take the photo whole, `?faces=whole`), and
prints requests/s, p50 and p99 latency and ratios, then Serve alone on the photos with faces
detected (`?faces=detect`), which the baseline cannot do.
A third server, `bench.noop_app` (Serve with no model), shows what Serve's own request path
allows on this machine.
"""

import argparse
import asyncio
import io
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

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


# The load generator shares the machine's cores with the server it measures, so it must spend as
# little of them as it can: httpx clients took a large share of them from the Serve application
# (per-process CPU sampled under load; docs/benchmarks.md). These clients speak HTTP/1.1 over
# plain asyncio streams on keep-alive connections, with each multipart body encoded once before
# the clock starts: per request they parse a status line and headers, nothing more. Every server
# gets the same clients, so the comparison stays side by side; what changes is how much CPU is
# left to serve.


def multipart_request(url: str, field: str, filename: str, content_type: str, data: bytes) -> bytes:
    """The bytes of one keep-alive POST of `data` as multipart field `field` to `url`."""
    parts = urlsplit(url)
    boundary = uuid.uuid4().hex
    body = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\n"
        f"Content-Type: {content_type}\r\n\r\n".encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    head = (
        f"POST {parts.path or '/'}{'?' + parts.query if parts.query else ''} HTTP/1.1\r\n"
        f"Host: {parts.netloc}\r\nConnection: keep-alive\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def _exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes
) -> tuple[int, bool]:
    """Send one request and read its whole response: (status, whether the server keeps the connection)."""
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    fields = (line.split(":", 1) for line in lines[1:] if ":" in line)
    headers = {name.strip().lower(): value.strip().lower() for name, value in fields}
    if "content-length" not in headers:
        raise RuntimeError(f"response without Content-Length (status {status}): this client reads only those")
    await reader.readexactly(int(headers["content-length"]))
    return status, headers.get("connection") != "close"


async def closed_loop(
    url: str, requests: list[bytes], concurrency: int, seconds: float
) -> tuple[list[float], int, float]:
    """`concurrency` clients, each sending its next request as soon as the last one is answered,
    cycling through `requests`: latencies of the 200s, the count of other answers, elapsed s."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    latencies: list[float] = []
    failures = 0
    deadline = time.perf_counter() + seconds

    async def client(offset: int) -> None:
        nonlocal failures
        connection = None
        sent = offset
        while time.perf_counter() < deadline:
            if connection is None:
                connection = await asyncio.open_connection(host, port)
            request, sent = requests[sent % len(requests)], sent + 1
            started = time.perf_counter()
            status, keep = await _exchange(*connection, request)
            if status == 200:
                latencies.append(time.perf_counter() - started)
            else:
                failures += 1
            if not keep:
                connection[1].close()
                connection = None
        if connection is not None:
            connection[1].close()

    started = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(concurrency)))
    return latencies, failures, time.perf_counter() - started


def drive(url: str, images: list[bytes], concurrency: int, seconds: float) -> tuple[float, float, float, int]:
    """Requests/s, p50 and p99 ms, failures: `concurrency` closed-loop clients posting `images`."""
    requests = [multipart_request(url, "file", "face.jpg", "image/jpeg", image) for image in images]
    latencies, failures, elapsed = asyncio.run(closed_loop(url, requests, concurrency, seconds))
    ms = np.asarray(latencies or [float("nan")]) * 1000
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
    photos = [photo(face) for face in FACES]
    # Both servers classify the photo whole (the baseline cannot detect faces); what detection
    # costs Serve is measured apart, with no baseline counterpart.
    images = {"48x48 face": ([face.read_bytes() for face in FACES], ""),
              "640x480 photo": (photos, "?faces=whole")}
    detecting = ("640x480 photo, faces detected", photos, "?faces=detect")
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
                if name != "serve no-op":
                    print(f"{name}: precision {httpx.get(url + '/health').json()['precision']}", flush=True)
                runs = [(label, image, query) for label, (image, query) in images.items()]
                for label, image, query in runs + ([detecting] if name == "serve" else []):
                    drive(url + "/predict" + query, image, 4, 2)
                    for concurrency in args.concurrency:
                        results[name, label, concurrency] = drive(
                            url + "/predict" + query, image, concurrency, args.seconds)
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
    print(f"\nServe, {detecting[0]}:")
    for concurrency in args.concurrency:
        d = results["serve", detecting[0], concurrency]
        print(f"{'':<15}{concurrency:>5}{d[0]:>13.1f}{d[1]:>8.1f}{d[2]:>8.1f}")
    print("\nServe with no model (request path only):")
    for label in images:
        for concurrency in args.concurrency:
            n, b = results["serve no-op", label, concurrency], results["baseline", label, concurrency]
            print(f"{label:<15}{concurrency:>5}{n[0]:>13.1f}{n[1]:>8.1f}{n[2]:>8.1f}   {n[0] / b[0]:.2f}x baseline")


if __name__ == "__main__":
    main()
