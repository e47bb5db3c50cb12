"""Shared test helpers: paths, tiny checkpoints, and real multi-rank launches with timeouts."""

from __future__ import annotations

import contextlib
import glob
import os
import signal
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

from shield_ds.launch.env import free_local_port as free_port  # noqa: E402  (one helper; tests call it free_port)
from shield_ds.process_group import SHM_BUFFER_PREFIX  # noqa: E402  (imports torch: after the thread settings above)


def data_dir() -> Path:
    return Path(os.environ.get("SHIELD_DS_DATA", REPO.parent / "shared" / "data")).resolve()


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


def start_cmd(cmd: list[str], *, cwd: Path = REPO, env: dict[str, str] | None = None,
              stderr_to_stdout: bool = False) -> subprocess.Popen:
    """Start a command in its own session (process group), so `stop_group` reaches everything it starts."""
    return subprocess.Popen(cmd, cwd=cwd, env=env or child_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT if stderr_to_stdout else subprocess.PIPE, text=True,
                            start_new_session=True)


def stop_group(proc: subprocess.Popen) -> tuple[str, str]:
    """SIGKILL the process group of `proc` (the launcher and every rank it started); its output so far."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    try:
        out, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:  # a process outside the group still holds the pipes
        proc.kill()
        out, err = "", ""
    return out or "", err or ""


def finish_cmd(proc: subprocess.Popen, cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Wait for a `start_cmd` process; on timeout, or when the test is interrupted (a pytest-timeout,
    Ctrl-C), kill its whole process group first (no orphaned ranks). A timeout fails the test."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        out, err = stop_group(proc)
        pytest.fail(f"timed out after {timeout}s: {' '.join(map(str, cmd))}\n--- stdout\n{out[-6000:]}\n"
                    f"--- stderr\n{err[-6000:]}")
    except BaseException:
        stop_group(proc)
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out or "", err or "")


def run_cmd(cmd: list[str], *, timeout: float = 600, check: bool = True, cwd: Path = REPO,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run a command with a timeout (a hang fails the test, and kills all it started); on failure show its output."""
    proc = finish_cmd(start_cmd(cmd, cwd=cwd, env=env), cmd, timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"exit {proc.returncode}: {' '.join(map(str, cmd))}\n--- stdout\n{proc.stdout[-6000:]}\n"
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


def assert_one_line_error(proc: subprocess.CompletedProcess, *names: str) -> str:
    """A user error as the recipes report it: exit code 2, exactly one `error: ...` line on stderr (the
    last; log lines may come before it), no traceback, and the line names each of `names`. Returns it."""
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stderr[-3000:]}"
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], proc.stderr[-3000:]
    assert "Traceback (most recent call last)" not in proc.stderr, proc.stderr[-3000:]
    for name in names:
        assert name in errors[0], f"{name!r} not in {errors[0]!r}"
    return errors[0]


def require_or_skip(condition: bool, reason: str) -> None:
    """Skip the test unless `condition`; under CI=true a missing requirement fails it instead (the Slurm and
    MPI tests may not silently skip in CI)."""
    if condition:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: this test may not skip)")
    pytest.skip(reason)


# Room for a test's own work (tiny builds, in-process stages) on top of its subprocess timeouts.
TIMEOUT_MARGIN = 300


def timeout_above(*inner: float) -> pytest.MarkDecorator:
    """A pytest-timeout mark above the sum of a test's inner subprocess timeouts (fixtures it may build
    included), so the inner timeout fires first and reports the command's output."""
    return pytest.mark.timeout(sum(inner) + TIMEOUT_MARGIN)


# DeepSpeed's CPU backend names one ~70 MB all-reduce buffer per rank; `process_group.init_distributed` unlinks
# them once every rank mapped them, but a rank killed before that (a timeout, a test that kills a launch
# on purpose) leaves its buffer behind until reboot.
SHM_BUFFERS = f"{SHM_BUFFER_PREFIX}_{os.getuid()}_*"


def orphaned_shm_buffers(before: set[str]) -> set[str]:
    """The DeepSpeed buffers (`SHM_BUFFERS`) not in `before` that no live process maps (/proc/*/maps)."""
    mapped: set[str] = set()
    for maps in glob.glob("/proc/[0-9]*/maps"):
        with contextlib.suppress(OSError), open(maps) as f:
            rows = (line.rstrip("\n").split(maxsplit=5) for line in f)
            mapped.update(row[5] for row in rows if len(row) == 6)
    return {path for path in glob.glob(SHM_BUFFERS) if path not in before and path not in mapped}


@pytest.fixture(scope="session", autouse=True)
def unlink_orphaned_shm_buffers():
    """After the session, remove the DeepSpeed buffers its launches left behind."""
    before = set(glob.glob(SHM_BUFFERS))
    yield
    for path in orphaned_shm_buffers(before):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


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
