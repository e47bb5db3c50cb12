"""Shared test helpers: paths, tiny checkpoints, and real multi-rank launches with timeouts."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
DEEPSPEED = str(Path(PYTHON).with_name("deepspeed"))

os.environ.setdefault("OMP_NUM_THREADS", "1")
# One DeepSpeed extension cache per environment (see scripts/env.sh).
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def data_dir() -> Path:
    return Path(os.environ.get("SHIELD_DS_DATA", REPO.parent / "shared" / "data")).resolve()


def free_port() -> int:
    """A TCP port that is free now (for MASTER_PORT)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"})
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    # The environment's own tools first (its ninja): DeepSpeed rebuilds its CPU comm op, with every rank
    # waiting on the lock, whenever the ninja that builds it changes between launches.
    env["PATH"] = os.pathsep.join([str(Path(PYTHON).parent), env.get("PATH", "")])
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env.update(extra)
    return env


def run_cmd(cmd: list[str], *, timeout: float = 600, check: bool = True, cwd: Path = REPO,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run a command with a timeout (a hang fails the test); on failure show its output."""
    try:
        proc = subprocess.run(cmd, cwd=cwd, env=env or child_env(), capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"")[-6000:] if isinstance(exc.stdout, bytes) else (exc.stdout or "")[-6000:]
        pytest.fail(f"timed out after {timeout}s: {' '.join(cmd)}\n{out}")
    if check and proc.returncode != 0:
        pytest.fail(f"exit {proc.returncode}: {' '.join(cmd)}\n--- stdout\n{proc.stdout[-6000:]}\n"
                    f"--- stderr\n{proc.stderr[-8000:]}")
    return proc


def run_deepspeed(script: str | Path, args: list[str], *, num_ranks: int = 2, timeout: float = 600,
                  check: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Start `script` on `num_ranks` CPU ranks through the real deepspeed launcher."""
    cmd = [DEEPSPEED, "--num_gpus", str(num_ranks), "--master_port", str(free_port()), str(script), *args]
    return run_cmd(cmd, timeout=timeout, check=check, env=env)


def run_python(args: list[str], *, timeout: float = 600, check: bool = True,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `python ARGS` in one process (no launcher)."""
    return run_cmd([PYTHON, *args], timeout=timeout, check=check, env=env)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = data_dir()
    if not (path / "multijail.csv").exists():
        pytest.fail(f"shared data not found at {path} (set SHIELD_DS_DATA)")
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Factory: tiny_checkpoint("llava") -> a saved HF checkpoint directory (built once per session)."""
    from shield_ds.models.tiny import build_tiny

    root = tmp_path_factory.mktemp("tiny")
    built: dict[str, Path] = {}

    def get(arch: str = "llava") -> Path:
        if arch not in built:
            built[arch] = Path(build_tiny(arch, root / arch))
        return built[arch]

    return get
