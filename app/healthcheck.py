"""The container image's HEALTHCHECK: ``GET /healthz`` on the port cascade serves, from inside it.

``python -m app.healthcheck [CMDLINE]`` exits 0 when the proxy answers 200. The port is the one the
server was started with: ``serve --port N`` or ``--port=N`` on PID 1's command line (``CMDLINE``, default
``/proc/1/cmdline``; also behind ``docker run --init``), else ``CASCADE_PORT``, else ``server.port`` of the
config file (``CASCADE_CONFIG``), else 8000: the settings' own precedence. (The image used to set
``CASCADE_PORT`` and the other server settings in its environment, which silently overrode a mounted
config's ``server`` section.) Standard library and PyYAML only: it runs every 15 seconds.
"""

from __future__ import annotations

import os
import sys
import urllib.request
from pathlib import Path

DEFAULT_PORT = "8000"


def served_port(cmdline: str = "/proc/1/cmdline") -> str:
    try:
        argv = Path(cmdline).read_bytes().decode(errors="replace").split("\0")
    except OSError:
        argv = []
    for i, arg in enumerate(argv):
        if arg.startswith("--port="):
            return arg.removeprefix("--port=")
        if arg == "--port" and i + 1 < len(argv):
            return argv[i + 1]
    if os.environ.get("CASCADE_PORT"):
        return os.environ["CASCADE_PORT"]
    return _config_port() or DEFAULT_PORT


def _config_port() -> str | None:
    import yaml

    try:
        with open(os.environ.get("CASCADE_CONFIG", "config.yaml"), encoding="utf-8") as fh:
            cfg = yaml.safe_load(fh)
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return None
    server = cfg.get("server") if isinstance(cfg, dict) else None
    port = server.get("port") if isinstance(server, dict) else None
    return str(port) if isinstance(port, int) and not isinstance(port, bool) else None


def main(argv: list[str]) -> int:
    port = served_port(*argv[:1])
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=4) as r:
            return 0 if r.status == 200 else 1
    except OSError as exc:
        print(f"healthcheck: http://127.0.0.1:{port}/healthz: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
