"""The test harness itself (conftest.py): a timed-out or interrupted command leaves no process behind,
the one-line error assertion holds recipes to their contract, and CI runs may not skip."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import PYTHON, assert_one_line_error, finish_cmd, require_or_skip, run_cmd, start_cmd


def _spawner(pid_file: Path) -> list[str]:
    """A command whose child starts a sleeping grandchild (like a launcher and its ranks), then sleeps."""
    code = ("import subprocess, time\n"
            "grandchild = subprocess.Popen(['sleep', '300'])\n"
            f"open({str(pid_file)!r}, 'w').write(str(grandchild.pid))\n"
            "time.sleep(300)\n")
    return [PYTHON, "-c", code]


def _wait_for_pid(pid_file: Path, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not (pid_file.exists() and pid_file.read_text()):
        assert time.monotonic() < deadline, "the command never started its grandchild"
        time.sleep(0.1)


def _gone(pid: int, seconds: float = 10) -> bool:
    """Whether process `pid` ended within `seconds` (a zombie waiting for its reaper counts as ended)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.1)
    return False


def test_timeout_kills_the_whole_process_group(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    cmd = _spawner(pid_file)
    proc = start_cmd(cmd)
    _wait_for_pid(pid_file)
    with pytest.raises(pytest.fail.Exception, match="timed out after 1s"):
        finish_cmd(proc, cmd, timeout=1)
    assert proc.returncode is not None
    assert _gone(int(pid_file.read_text())), "the grandchild outlived the timeout"


def test_interrupted_wait_kills_the_whole_process_group(tmp_path):
    """What pytest-timeout's signal method does to a test waiting on a command: an exception raised
    inside the wait. The command's process group goes with it."""
    pid_file = tmp_path / "grandchild.pid"
    cmd = _spawner(pid_file)
    proc = start_cmd(cmd)
    _wait_for_pid(pid_file)

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.alarm(1)
        with pytest.raises(KeyboardInterrupt):
            finish_cmd(proc, cmd, timeout=60)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert proc.returncode is not None
    assert _gone(int(pid_file.read_text())), "the grandchild outlived the interrupted wait"


def _completed(returncode: int, stderr: str) -> subprocess.CompletedProcess:
    return subprocess.CompletedProcess(["recipe"], returncode, "", stderr)


def test_one_line_error_assertion():
    log = "12:00:01 INFO shield_ds.train: loading\n"
    assert assert_one_line_error(_completed(2, f"{log}error: runs/x: no neurons\n"), "runs/x") == \
        "error: runs/x: no neurons"
    bad = [_completed(1, "error: runs/x: no neurons\n"),  # another exit code
           _completed(2, "error: runs/x: no neurons\nerror: runs/x: no neurons\n"),  # two lines (two ranks)
           _completed(2, "error: runs/x: no neurons\n12:00:02 INFO shield_ds.train: more\n"),  # not the last line
           _completed(2, "Traceback (most recent call last):\n  ...\nerror: runs/x: no neurons\n"),
           _completed(2, "error: no neurons\n"),  # does not name runs/x
           _completed(2, log)]  # no error line
    for proc in bad:
        with pytest.raises(AssertionError):
            assert_one_line_error(proc, "runs/x")


def test_run_cmd_returns_output_and_fails_on_exit_code():
    proc = run_cmd([PYTHON, "-c", "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)"],
                   timeout=60, check=False)
    assert (proc.returncode, proc.stdout, proc.stderr) == (3, "out\n", "err\n")
    with pytest.raises(pytest.fail.Exception, match="exit 3"):
        run_cmd([PYTHON, "-c", "import sys; sys.exit(3)"], timeout=60)


def test_require_or_skip_fails_under_ci(monkeypatch):
    require_or_skip(True, "present")
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no mpirun"):
        require_or_skip(False, "no mpirun")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="no mpirun .CI=true"):
        require_or_skip(False, "no mpirun")


def test_orphaned_shm_buffers_are_the_new_unmapped_ones():
    """The session's cleanup takes a DeepSpeed buffer a killed launch left, never one a live rank maps or
    one that was there before the session."""
    import mmap
    import os

    from conftest import SHM_BUFFERS, orphaned_shm_buffers

    prefix = SHM_BUFFERS.rstrip("*") + f"harness_{os.getpid()}"
    old, left, live = (Path(f"{prefix}_{name}") for name in ("old", "left", "live"))
    try:
        old.write_bytes(b"\0" * 4096)
        before = {str(old)}
        left.write_bytes(b"\0" * 4096)
        live.write_bytes(b"\0" * 4096)
        with open(live, "r+b") as f, mmap.mmap(f.fileno(), 4096):
            found = {p for p in orphaned_shm_buffers(before) if p.startswith(prefix)}
        assert found == {str(left)}
    finally:
        for path in (old, left, live):
            path.unlink(missing_ok=True)
