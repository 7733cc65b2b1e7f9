"""Real services for end-to-end tests: a local Ray head with token auth, and an S3 server (moto).

The head runs with `ray start --head --block` in its own process group and its own ports and
temp dir, so stopping it never touches another Ray instance on the machine.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import httpx
import pyarrow
import pyarrow.parquet

from serve.environment import serving_env

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """`count` distinct free ports: the sockets stay bound until all are chosen, since a port
    released at once may be handed out again (a Ray head once got one port for two components)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@dataclass
class RayHead:
    gcs_address: str
    dashboard_url: str
    temp_dir: str

    def env(self, **extra: str) -> dict[str, str]:
        """Client environment as a user sets it: token auth on, this venv's tools first on PATH."""
        env = dict(os.environ)
        env.update(
            RAY_AUTH_MODE="token",
            RAY_ADDRESS=self.dashboard_url,
            PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        )
        env.update(extra)
        return env

    def submit(self, *entrypoint: str, env_vars: dict[str, str] | None = None, timeout: float = 600,
               wait: bool = True) -> subprocess.CompletedProcess:
        """`ray job submit --working-dir <project> -- <entrypoint>`, as the README shows."""
        command = [str(BIN / "ray"), "job", "submit", "--address", self.dashboard_url,
                   "--working-dir", str(ROOT)]
        if env_vars:
            command += ["--runtime-env-json", json.dumps({"env_vars": env_vars})]
        if not wait:
            command.append("--no-wait")
        command += ["--", *entrypoint]
        return subprocess.run(command, cwd=ROOT, env=self.env(), capture_output=True, text=True,
                              timeout=timeout)

    def start_job(self, *entrypoint: str) -> str:
        """Submit without waiting; the job's id."""
        return self.submit(*entrypoint, wait=False).stdout.split("Job '")[1].split("'")[0]

    def job_command(self, *words: str) -> str:
        """`ray job WORDS...` against this head; its standard output."""
        return subprocess.run([str(BIN / "ray"), "job", *words, "--address", self.dashboard_url], env=self.env(),
                              capture_output=True, text=True, timeout=120).stdout

    def shut_down_serve(self, timeout: float = 120) -> None:
        """`serve shutdown`, then wait until Serve's actors are gone. The command returns once
        the request is sent, and exits 0 even where it could not send it (it logs the error),
        so the wait is the check; a replica still holding CPUs would stall a later job that
        asks for all of them."""
        subprocess.run([str(BIN / "serve"), "shutdown", "-y", "--address", self.dashboard_url], env=self.env(),
                       capture_output=True, check=True, timeout=timeout)
        deadline = time.monotonic() + timeout
        while (alive := self.alive_actors(namespace="serve")) and time.monotonic() < deadline:
            time.sleep(1)
        assert not alive, f"Serve actors still alive {timeout} s after serve shutdown: {alive}"

    def alive_actors(self, namespace: str) -> list[str]:
        """The class names of the alive actors in `namespace`, from `ray list actors`."""
        listed = subprocess.run([str(BIN / "ray"), "list", "actors", "--address", self.dashboard_url,
                                 "--filter", "state=ALIVE", "--filter", f"ray_namespace={namespace}",
                                 "--format", "json"], env=self.env(), capture_output=True, text=True,
                                check=True, timeout=120).stdout
        # With nothing to list, the command prints a sentence instead of an empty JSON list.
        return [actor["class_name"] for actor in json.loads(listed)] if listed.lstrip().startswith("[") else []

    def wait_for_job(self, job_id: str, timeout: float) -> str:
        """SUCCEEDED, FAILED or STOPPED once the job ends; TIMEOUT if it has not by `timeout`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.job_command("status", job_id).lower()
            for state in ("SUCCEEDED", "FAILED", "STOPPED"):
                if f"job '{job_id}' {state}".lower() in status:
                    return state
            time.sleep(3)
        return "TIMEOUT"


def run_job(module: str, *args: str, env: Mapping[str, str] | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m jobs.MODULE ARGS...` from the project root, as a user runs it; `env` (the
    `job_env` fixture's, say) joins it to a running cluster, where without RAY_ADDRESS it starts
    its own local Ray. A job still running at `timeout` fails the test with the end of what it
    logged, which says where it waits."""
    try:
        return subprocess.run([sys.executable, "-m", f"jobs.{module}", *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as exc:
        logged = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr or ""
        raise AssertionError(f"jobs.{module} still running after {timeout:g} s; its log ends:\n"
                             f"{logged[-6000:]}") from None


def command_refusal(module: str, *args: str, env: Mapping[str, str] | None = None) -> str:
    """The one line `python -m jobs.MODULE ARGS...` prints on stderr as it refuses (exit 2), with
    nothing on stdout: what its import and interpreter print is seen here, unlike in-process."""
    refused = run_job(module, *args, env=env)
    assert (refused.returncode, refused.stdout) == (2, ""), refused.stdout + refused.stderr
    assert refused.stderr.endswith("\n") and refused.stderr.count("\n") == 1, refused.stderr
    return refused.stderr.strip()


def rows_written(folder: Path) -> int:
    """Rows in the Parquet files of a running (or stopped) job's `folder` that are whole.

    A file still being written, or cut short when its job was stopped, has no footer yet; it
    is not counted (the job's resume removes it).
    """
    rows = 0
    for path in folder.glob("*.parquet"):
        try:
            rows += pyarrow.parquet.ParquetFile(path).metadata.num_rows
        except (pyarrow.ArrowInvalid, OSError):
            continue
    return rows


def wait_for_rows(folder: Path, timeout: float) -> int:
    """Block until a job has written a whole Parquet file under `folder`; its rows so far."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if rows := rows_written(folder):
            return rows
        time.sleep(0.1)
    return 0


def _stop_group(process: subprocess.Popen) -> None:
    """SIGTERM a process group, SIGKILL it if it lingers: `ray start --block` outlives a SIGTERM
    by more than 30 s here, and the test is done with its node either way."""
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)


@contextmanager
def ray_head(num_cpus: int = 2, **settings: str) -> Iterator[RayHead]:
    """A head with token auth and conf/serve.env's settings, as cluster.yaml starts one, and
    `settings` (Ray's environment variables) besides. The token is made once, as a user makes
    it: `ray start --head` turns token auth on only where ~/.ray/auth_token exists, and with
    RAY_AUTH_MODE=token it refuses to start without one. Serve's replicas and proxies here drain
    for (almost) no minimum period on shutdown: with HAProxy on, Ray holds each 30 s for load
    balancers to notice, and nothing balances load in front of a test's cluster."""
    subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], capture_output=True, check=True, timeout=120)
    ports = free_ports(10)
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    command = [
        str(BIN / "ray"), "start", "--head", "--block", "--disable-usage-stats",
        f"--num-cpus={num_cpus}", f"--temp-dir={temp_dir}",
        f"--port={ports[0]}", f"--dashboard-port={ports[1]}", "--dashboard-host=127.0.0.1",
        f"--dashboard-agent-listen-port={ports[2]}", f"--dashboard-agent-grpc-port={ports[3]}",
        f"--metrics-export-port={ports[4]}", f"--runtime-env-agent-port={ports[5]}",
        f"--node-manager-port={ports[6]}", f"--object-manager-port={ports[7]}",
        f"--ray-client-server-port={ports[8]}",
    ]
    env = dict(os.environ, RAY_AUTH_MODE="token", PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
               **serving_env(),
               RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S="0", RAY_SERVE_PROXY_MIN_DRAINING_PERIOD_S="0.1",
               **settings)
    log = open(Path(temp_dir) / "head.log", "w")  # noqa: SIM115 - lives as long as the head
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                               start_new_session=True)
    head = RayHead(f"127.0.0.1:{ports[0]}", f"http://127.0.0.1:{ports[1]}", temp_dir)
    try:
        _wait_for_job_agent(head, process)
        yield head
    finally:
        _stop_group(process)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


@dataclass
class RayWorker:
    """A second node joined to a head on this machine; `kill` takes it down as a lost machine
    goes: every process of the node at once, with no chance to say goodbye."""

    process: subprocess.Popen
    node_manager_port: int

    def kill(self) -> None:
        os.killpg(self.process.pid, signal.SIGKILL)


@contextmanager
def ray_worker(head: RayHead, num_cpus: int = 1) -> Iterator[RayWorker]:
    """`ray start --address` for one more node, with its own ports and temp dir (its sockets)."""
    ports = free_ports(8)
    command = [
        str(BIN / "ray"), "start", f"--address={head.gcs_address}", "--block", "--disable-usage-stats",
        f"--num-cpus={num_cpus}", f"--node-manager-port={ports[0]}", f"--object-manager-port={ports[1]}",
        f"--metrics-export-port={ports[2]}", f"--dashboard-agent-listen-port={ports[3]}",
        f"--dashboard-agent-grpc-port={ports[4]}", f"--runtime-env-agent-port={ports[5]}",
        f"--temp-dir={tempfile.mkdtemp(prefix='ray-worker-', dir=head.temp_dir)}",
    ]
    env = dict(os.environ, RAY_AUTH_MODE="token", PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
               **serving_env())
    log = open(Path(head.temp_dir) / f"worker-{ports[0]}.log", "w")  # noqa: SIM115 - lives as long as the node
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    worker = RayWorker(process, ports[0])
    try:
        _wait_for_nodes(head, 2)
        yield worker
    finally:
        if process.poll() is None:
            _stop_group(process)
        log.close()


def _wait_for_nodes(head: RayHead, count: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    probe = "import ray; ray.init(); print(sum(n['Alive'] for n in ray.nodes()))"
    while time.monotonic() < deadline:
        result = subprocess.run([sys.executable, "-c", probe], env=head.env(RAY_ADDRESS=head.gcs_address),
                                capture_output=True, text=True, timeout=120)
        if result.returncode == 0 and result.stdout.strip().splitlines()[-1:] == [str(count)]:
            return
        time.sleep(2)
    raise RuntimeError(f"the cluster did not reach {count} alive nodes in time")


def _wait_for_job_agent(head: RayHead, process: subprocess.Popen, timeout: float = 120) -> None:
    """Block until the head accepts job submissions (the job agent starts after the dashboard)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"ray head exited: see {head.temp_dir}/head.log")
        result = subprocess.run(
            [str(BIN / "ray"), "job", "list", "--address", head.dashboard_url],
            env=head.env(), capture_output=True, text=True,
        )
        if result.returncode == 0:
            probe = head.submit("python", "-c", "print('ready')", timeout=120)
            if probe.returncode == 0:
                return
        time.sleep(2)
    raise RuntimeError("ray head did not accept jobs in time")


@dataclass
class S3Server:
    endpoint_url: str

    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def client(self) -> Any:
        """A boto3 S3 client for this server, the tests' own view of the buckets (boto3 builds its
        client classes at run time, hence no finer type)."""
        return boto3.client("s3", endpoint_url=self.endpoint_url, aws_access_key_id="testing",
                            aws_secret_access_key="testing", region_name="us-east-1")


@contextmanager
def s3_server() -> Iterator[S3Server]:
    """moto's S3 protocol server on loopback, in its own process."""
    port = free_port()
    process = subprocess.Popen(
        [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    server = S3Server(f"http://127.0.0.1:{port}")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            httpx.get(server.endpoint_url, timeout=1)
            break
        except httpx.HTTPError:
            time.sleep(0.2)
    try:
        yield server
    finally:
        process.terminate()
        process.wait(timeout=10)
