"""The ``cascade`` command: serve, check-config (calibrate and replay live in their own modules)."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from types import FrameType

from app.config import Config, ConfigError
from app.settings import load_effective

EXIT_CONFIG = 2


def _fail(problems: Sequence[str]) -> int:
    for line in problems:
        print(line, file=sys.stderr)
    return EXIT_CONFIG


def _check_buildable(cfg: Config) -> None:
    """Build every upstream client and scorer once, as serving would, to surface their errors now."""
    from prometheus_client import CollectorRegistry

    from app.metrics import Metrics
    from app.runtime import build_runtime
    from app.upstream.transport import AiohttpTransport

    build_runtime(cfg, AiohttpTransport(max_connections=1), Metrics(CollectorRegistry()))


def cmd_check_config(args: argparse.Namespace) -> int:
    try:
        path, cfg = load_effective(args.path, {})
        _check_buildable(cfg)
    except ConfigError as exc:
        return _fail(exc.problems)
    print(f"{path}: ok ({len(cfg.upstreams)} upstreams, {len(cfg.cascades)} cascades)")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    cli = {"host": args.host, "port": args.port, "workers": args.workers}
    try:
        path, cfg = load_effective(args.config, cli)
        _check_buildable(cfg)
    except ConfigError as exc:
        return _fail(exc.problems)

    from app.logs import setup_logging
    from app.server import serve

    setup_logging(cfg.server.log_level, cfg.server.log_format)
    metrics_dir = None
    if cfg.server.workers > 1:
        metrics_dir = _EnvMetricsDir.prepare()
    try:
        return serve(os.path.abspath(path), cfg, cli, metrics_dir)
    finally:
        if metrics_dir is not None and not os.environ.get("CASCADE_METRICS_DIR"):
            shutil.rmtree(metrics_dir, ignore_errors=True)  # the temporary one it made: gone with it


class _EnvMetricsDir:
    @staticmethod
    def prepare() -> str:
        """A clean prometheus multiprocess directory, exported so every worker writes to it."""
        base = os.environ.get("CASCADE_METRICS_DIR")
        if base:
            shutil.rmtree(base, ignore_errors=True)
            os.makedirs(base, exist_ok=True)
            path = base
        else:
            path = tempfile.mkdtemp(prefix="cascade-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
        return path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cascade", description="Quality-based model cascade proxy (OpenAI-compatible)."
    )
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the proxy")
    s.add_argument("--config", help="config file (default: $CASCADE_CONFIG or ./config.yaml)")
    s.add_argument("--host")
    s.add_argument("--port", type=int)
    s.add_argument("--workers", type=int)
    s.set_defaults(func=cmd_serve)

    c = sub.add_parser("check-config", help="validate a config file and exit (0 ok, 2 problems)")
    c.add_argument("path", nargs="?")
    c.set_defaults(func=cmd_check_config)

    from app.learning import cli as learning_cli
    from app.replay import cli as replay_cli

    learning_cli.add_commands(sub)
    replay_cli.add_commands(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":  # uvicorn drains on SIGTERM and Ctrl-C (app.server)
        served: int = args.func(args)
        return served
    return run_interruptible(f"cascade {args.command}", lambda: int(args.func(args)))


def run_interruptible(name: str, command: Callable[[], int]) -> int:
    """Run a batch command (replay, calibrate, fit-scorer) so that SIGTERM stops it as Ctrl-C does.

    Python's default SIGTERM kills the process where it stands: no ``finally``, so `cascade replay`
    left its temporary directory (the trace store, the fitted scorers) behind. Here SIGTERM takes the
    SIGINT path: inside ``asyncio.run`` its handler cancels the main task, so the in-process servers
    stop, the store closes and the temporary directory goes; elsewhere KeyboardInterrupt unwinds the
    same way. Either way one line on stderr and the shell's exit status, 128 + the signal's number.
    (Only from the main thread, where signal handlers can be set: a test calling ``main`` from another
    thread gets the plain call.)
    """
    if threading.current_thread() is not threading.main_thread():
        return command()
    received: list[int] = []

    def on_term(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        on_int = signal.getsignal(signal.SIGINT)
        if callable(on_int):  # asyncio.run's own handler, or the default one that raises
            on_int(signal.SIGINT, frame)
        else:  # SIGINT ignored (a background job of a script) or at its default
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        return command()
    except KeyboardInterrupt:
        number = received[-1] if received else int(signal.SIGINT)
        print(f"\n{name}: interrupted ({signal.Signals(number).name})", file=sys.stderr)
        return 128 + number
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
