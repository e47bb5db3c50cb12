"""The sbatch scripts, submitit and the requeue path on a real single-node Slurm (scripts/slurm_local.sh)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from conftest import PYTHON, REPO, child_env, run_cmd
from shield_ds.launch.env import expand_nodelist

pytestmark = pytest.mark.slurm

SLURM_LOCAL = REPO / "scripts" / "slurm_local.sh"
DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
SCALED_DOWN = ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=10"]


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """Start the local cluster for the session; yield the environment its clients need."""
    if os.geteuid() != 0:
        pytest.skip("the local Slurm cluster needs root (slurmd runs jobs as the submitting user)")
    state = tmp_path_factory.mktemp("slurm")
    run_cmd(["bash", str(SLURM_LOCAL), "start", str(state)], timeout=600)
    env = child_env(SLURM_CONF=str(state / "slurm.conf"), PYTHON=PYTHON)
    try:
        yield env
    finally:
        subprocess.run(["bash", str(SLURM_LOCAL), "stop", str(state)], timeout=120, capture_output=True)


def job_fields(job_id: str, env: dict[str, str]) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=env, capture_output=True, text=True,
                         timeout=60).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_job(job_id: str, env: dict[str, str], timeout: float = 240,
             until=lambda fields: fields.get("JobState") in DONE) -> dict[str, str]:
    """Poll scontrol until `until(fields)` (default: the job ended); fail on timeout."""
    deadline = time.monotonic() + timeout
    fields: dict[str, str] = {}
    while time.monotonic() < deadline:
        fields = job_fields(job_id, env)
        if until(fields):
            return fields
        time.sleep(1)
    subprocess.run(["scancel", job_id], env=env, timeout=60)
    pytest.fail(f"job {job_id} not done after {timeout}s: {fields}")


def sbatch(args: list[str], env: dict[str, str]) -> str:
    return run_cmd(["sbatch", "--parsable", *args], env=env, timeout=60).stdout.strip().split(";")[0]


def read_log(out: Path) -> str:
    return "\n".join(p.read_text() for p in sorted((out / "logs").glob("*.log")))


def test_scontrol_hostnames_agree_with_expand_nodelist(slurm):
    for nodelist in ("gpu[01-03,07],login1", "rack[1-2]-n[1-2]", "n[098-101]"):
        hosts = run_cmd(["scontrol", "show", "hostnames", nodelist], env=slurm, timeout=60).stdout.split()
        assert hosts == expand_nodelist(nodelist)


def test_sbatch_selfcheck_two_tasks(slurm, tmp_path):
    out = tmp_path / "run"
    env = dict(slurm, OUT=str(out))
    job = sbatch([*SCALED_DOWN, f"--output={tmp_path}/slurm-%j.out", "slurm/selfcheck.sh"], env)
    fields = wait_job(job, env)
    log = read_log(out)
    assert fields["JobState"] == "COMPLETED", f"{fields}\n{log[-4000:]}"
    summary = json.loads((out / "selfcheck.json").read_text())
    assert summary["ok"] and summary["world_size"] == 2 and summary["slurm_job_id"] == job
    # Ranks came from srun, and the port from the job id (shield_ds.launch.env), not from a launcher.
    assert summary["master"].endswith(f":{12000 + int(job)}")
    assert "env_from_scheduler ['LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT', 'RANK', 'WORLD_SIZE']" in log


def test_train_70b_scaled_down_command(slurm, tmp_path):
    out = tmp_path / "t70"
    env = dict(slurm, DRY_RUN="1", MODEL="/models/m", NEURONS="/runs/n", OUT=str(out), RESUME="1",
               EXTRA_ARGS="--max-grad-norm 1.0 --seed 3")
    job = sbatch([*SCALED_DOWN, f"--output={tmp_path}/slurm-%j.out", "slurm/train_70b.sh"], env)
    fields = wait_job(job, env)
    assert fields["JobState"] == "COMPLETED", fields
    command = next(line for line in read_log(out).splitlines() if line.startswith("=== command:"))
    assert "srun --nodes=1 --ntasks-per-node=2 --ntasks=2" in command
    assert command.endswith("recipes/train.py --neurons /runs/n --out " + str(out) +
                            " --ds-config ds_configs/zero3_bf16.json --model /models/m --resume"
                            " --max-grad-norm 1.0 --seed 3")
    assert fields["TimeLimit"] == "00:10:00" and fields["Requeue"] == "1"


def test_requeue_on_pre_timeout_signal(slurm, tmp_path):
    """USR1 to the batch shell (what --signal=B:USR1@600 sends) -> ranks exit 3 -> requeue -> --resume."""
    out = tmp_path / "run"
    env = dict(slurm, OUT=str(out), EXTRA_ARGS="--wait-for-preemption 180")
    job = sbatch([*SCALED_DOWN, f"--output={tmp_path}/slurm-%j.out", "slurm/selfcheck.sh"], env)
    # Signal once both ranks are in their step loop.
    waiting = "selfcheck waiting up to"
    wait_job(job, env, timeout=120, until=lambda f: waiting in (read_log(out) if (out / "logs").exists() else "")
             or f.get("JobState") in DONE)
    run_cmd(["scancel", "--batch", "--signal=USR1", job], env=env, timeout=60)
    fields = wait_job(job, env, timeout=240,
                      until=lambda f: f.get("JobState") in DONE and f.get("Restarts") == "1")
    log = read_log(out)
    assert fields["JobState"] == "COMPLETED", f"{fields}\n{log[-4000:]}"
    assert "outcome preempted" in log and "ranks exited with code 3" in log and "requeueing job" in log
    assert "selfcheck resume: restart 1, resume path taken" in log
    summary = json.loads((out / "selfcheck.json").read_text())
    assert summary["restart_count"] == 1 and summary["resumed"] and summary["outcome"] == "finished"


def submit(args: list[str], env: dict[str, str], timeout: float = 300) -> tuple[str, str]:
    proc = run_cmd([PYTHON, "recipes/submit.py", "selfcheck", "--cpu", "--gpus-per-node", "2", "--time", "10",
                    *args], env=env, timeout=timeout)
    job = re.search(r"as job (\d+)", proc.stdout).group(1)
    return job, proc.stdout


def test_submitit_selfcheck(slurm, tmp_path):
    job, stdout = submit(["--out", str(tmp_path), "--wait"], slurm)
    assert "finished: exit codes [0, 0]" in stdout
    summary = json.loads((tmp_path / "selfcheck.json").read_text())
    assert summary["ok"] and summary["world_size"] == 2 and summary["slurm_job_id"] == job


def test_submitit_requeue_resumes(slurm, tmp_path):
    """submitit's signal -> the recipe exits 3 -> RecipeTask.checkpoint() adds --resume -> requeued run resumes."""
    job, _ = submit(["--out", str(tmp_path), "--", "--wait-for-preemption", "180"], slurm)
    logs = tmp_path / "submitit" / job

    def started(fields):
        rank0 = logs / f"{job}_0_log.out"
        return (rank0.exists() and "selfcheck waiting up to" in rank0.read_text()) or fields.get("JobState") in DONE

    wait_job(job, slurm, timeout=120, until=started)
    run_cmd(["scancel", "--signal=USR2", job], env=slurm, timeout=60)
    fields = wait_job(job, slurm, timeout=240,
                      until=lambda f: f.get("JobState") in DONE and f.get("Restarts") == "1")
    text = (logs / f"{job}_0_log.out").read_text()
    assert fields["JobState"] == "COMPLETED", f"{fields}\n{text[-4000:]}"
    assert "outcome preempted" in text and "Requeued job" in text
    assert "selfcheck resume: restart 1, resume path taken" in text
    summary = json.loads((tmp_path / "selfcheck.json").read_text())
    assert summary["restart_count"] == 1 and summary["resumed"]
