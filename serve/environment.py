"""The environment a serving cluster's Ray processes start with, kept in conf/serve.env.

Serve reads these settings when its controller, proxies and replicas start, so they cannot live
in conf/serve.yaml; shells source the file (cluster.yaml does), and Python launchers use this.
"""

from pathlib import Path

SERVE_ENV = Path(__file__).resolve().parents[1] / "conf" / "serve.env"


def serving_env() -> dict[str, str]:
    """conf/serve.env as a mapping, comments and blank lines skipped."""
    lines = SERVE_ENV.read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line.strip() and not line.startswith("#"))
