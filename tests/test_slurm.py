"""The sbatch scripts, submitit and the requeue path on a real single-node Slurm (scripts/slurm_local.sh)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import PYTHON, REPO, child_env, require_or_skip, run_cmd, timeout_above
from shield_ds.launch.env import expand_nodelist

pytestmark = pytest.mark.slurm

SLURM_LOCAL = REPO / "scripts" / "slurm_local.sh"
DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
SCALED_DOWN = ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=10"]
# The README's "On a cluster" commands: identify.sh and train_70b.sh scaled down to 2 CPU ranks on the tiny
# default model (no --model), English text only, 4 records per group, benign answers from the model itself.
# The recipe's flags follow the script on the sbatch line; the tests add only --out and --neurons paths.
TINY_DATA = ["--languages", "en", "--modalities", "text", "--per-group-limit", "4"]
IDENTIFY_ARGS = [*TINY_DATA, "--ratio", "0.05", "--max-param-fraction", "0", "--batch-size", "4"]
# train_70b.sh asks for its pre-timeout signal 600 s before the limit: the limit must be well above that.
TRAIN_SCALED_DOWN = [*SCALED_DOWN[:-1], "--time=30"]
TRAIN_STEPS = 12
# Inner timeouts (s), summed in each test's timeout mark: starting the cluster, sbatch, and the waits for
# the module's identify and train jobs (a test may be the first to need them).
SLURM_START = 600
SBATCH = 60
IDENTIFY_JOB = SBATCH + 480
TRAIN_JOB = SBATCH + 480
TRAIN_ARGS = ["--ds-config", "ds_configs/zero3_fp32.json", *TINY_DATA, "--benign-targets", "self", "--max-new-tokens", "8",
              "--micro-batch-size", "2", "--max-steps", str(TRAIN_STEPS), "--save-every", "1"]


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """Start the local cluster for the session; yield the environment its clients need."""
    require_or_skip(os.geteuid() == 0, "the local Slurm cluster needs root (slurmd runs jobs as the submitting user)")
    state = tmp_path_factory.mktemp("slurm")
    run_cmd(["bash", str(SLURM_LOCAL), "start", str(state)], timeout=SLURM_START)
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
    return run_cmd(["sbatch", "--parsable", *args], env=env, timeout=SBATCH).stdout.strip().split(";")[0]


def read_log(out: Path) -> str:
    """The job logs of the run in OUT (slurm/common.sh writes them to logs/ beside OUT)."""
    return "\n".join(p.read_text() for p in sorted((out.parent / "logs").glob("*.log")))


def recipe_args(log: str, recipe: str) -> list[str]:
    """The arguments of `recipe` in the srun command a DRY_RUN=1 job logged."""
    command = next(line for line in log.splitlines() if line.startswith("=== command:"))
    return command.split(f" -u {recipe} ")[1].split()


def events_files(tb_dir: Path) -> list[Path]:
    return sorted(tb_dir.glob("events.out.tfevents.*"))


def scalar_tags(tb_dir: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    return set(acc.Tags()["scalars"])


@pytest.fixture(scope="module")
def tiny_env(slurm, tiny_checkpoint) -> dict[str, str]:
    """The cluster's environment with the tiny default model pointed at the session's tiny llava (same seeded build)."""
    return dict(slurm, SHIELD_DS_DEFAULT_MODEL=str(tiny_checkpoint("llava")))


@pytest.fixture(scope="module")
def identify_job(tiny_env, tmp_path_factory) -> dict:
    """slurm/identify.sh on 2 CPU ranks (the README command); its neurons feed the train jobs."""
    tmp = tmp_path_factory.mktemp("identify-job")
    out = tmp / "identify"
    job = sbatch([*SCALED_DOWN, f"--output={tmp}/slurm-%j.out", "slurm/identify.sh", "--out", str(out), *IDENTIFY_ARGS],
                 tiny_env)
    return {"job": job, "out": out, "fields": wait_job(job, tiny_env, timeout=480)}


def submit_train(identify: dict, out: Path, env: dict[str, str]) -> str:
    return sbatch([*TRAIN_SCALED_DOWN, f"--output={out.parent}/slurm-%j.out", "slurm/train_70b.sh",
                   "--neurons", str(identify["out"]), "--out", str(out), *TRAIN_ARGS], env)


@pytest.fixture(scope="module")
def train_job(identify_job, tiny_env, tmp_path_factory) -> dict:
    """slurm/train_70b.sh scaled down (the README command), uninterrupted."""
    out = tmp_path_factory.mktemp("train-job") / "train"
    job = submit_train(identify_job, out, tiny_env)
    return {"job": job, "out": out, "fields": wait_job(job, tiny_env, timeout=480)}


@timeout_above(SLURM_START, 3 * 60)
def test_scontrol_hostnames_agree_with_expand_nodelist(slurm):
    for nodelist in ("gpu[01-03,07],login1", "rack[1-2]-n[1-2]", "n[098-101]"):
        hosts = run_cmd(["scontrol", "show", "hostnames", nodelist], env=slurm, timeout=60).stdout.split()
        assert hosts == expand_nodelist(nodelist)


@timeout_above(SLURM_START, SBATCH, 240)
def test_sbatch_selfcheck_two_tasks(slurm, tmp_path):
    out = tmp_path / "run"
    job = sbatch([*SCALED_DOWN, f"--output={tmp_path}/slurm-%j.out", "slurm/selfcheck.sh", "--out", str(out)], slurm)
    fields = wait_job(job, slurm)
    log = read_log(out)
    assert fields["JobState"] == "COMPLETED", f"{fields}\n{log[-4000:]}"
    summary = json.loads((out / "selfcheck.json").read_text())
    assert summary["ok"] and summary["world_size"] == 2 and summary["slurm_job_id"] == job
    # Ranks came from srun, and the port from the job id (shield_ds.launch.env), not from a launcher.
    assert summary["master"].endswith(f":{12000 + int(job)}")
    assert "env_from_scheduler ['LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT', 'RANK', 'WORLD_SIZE']" in log


@timeout_above(SLURM_START, SBATCH, 240)
def test_train_70b_scaled_down_command(slurm, tmp_path):
    """The recipe's flags after the script reach every rank after the script's default --out, so the user's win
    (argparse keeps the last), in the recipe's own parser too; the log goes beside the user's --out."""
    from shield_ds.cli import read_config
    from shield_ds.train import TrainConfig

    out = tmp_path / "t70"
    user = ["--model", "/models/m", "--neurons", "/runs/n", "--out", str(out), "--ds-config", "ds_configs/zero3_offload.json",
            "--harmful", "a.jsonl", "--harmful", "b.csv", "--grad-accum", "2", "--seed", "3"]
    env = dict(slurm, DRY_RUN="1", RESUME="1")
    job = sbatch([*SCALED_DOWN, f"--output={tmp_path}/slurm-%j.out", "slurm/train_70b.sh", *user], env)
    fields = wait_job(job, env)
    assert fields["JobState"] == "COMPLETED", fields
    log = read_log(out)
    assert "srun --nodes=1 --ntasks-per-node=2 --ntasks=2 --kill-on-bad-exit=1 " in log
    args = recipe_args(log, "recipes/train.py")
    assert args == ["--out", "runs/train-70b", *user, "--resume"]
    cfg = read_config(TrainConfig, args)[0]
    assert (cfg.model, cfg.neurons, cfg.out, cfg.ds_config) == ("/models/m", "/runs/n", str(out),
                                                                 "ds_configs/zero3_offload.json")
    assert cfg.harmful == ["a.jsonl", "b.csv"] and cfg.grad_accum == 2 and cfg.seed == 3 and cfg.resume
    assert fields["TimeLimit"] == "00:10:00" and fields["Requeue"] == "1"


@timeout_above(SLURM_START, SBATCH, 240)
def test_a_config_file_takes_no_script_defaults(slurm, tmp_path):
    """With --config the script passes no defaults of its own (as flags they would beat the file's values);
    the file's out is invisible to the script, so LOG_DIR says where the log goes."""
    from shield_ds.cli import read_config
    from shield_ds.train import TrainConfig

    preset = tmp_path / "x.yaml"
    preset.write_text(f"model: /models/m\nout: {tmp_path / 'from-yaml'}\nds_config: ds_configs/zero3_offload.json\n")
    logs = tmp_path / "logs"
    env = dict(slurm, DRY_RUN="1", LOG_DIR=str(logs))
    job = sbatch([*SCALED_DOWN, f"--output={tmp_path}/slurm-%j.out", "slurm/train_7b.sh", f"--config={preset}",
                  "--seed", "3"], env)
    assert wait_job(job, env)["JobState"] == "COMPLETED"
    log = "\n".join(p.read_text() for p in logs.glob("*.log"))
    args = recipe_args(log, "recipes/train.py")
    assert args == [f"--config={preset}", "--seed", "3"]
    cfg = read_config(TrainConfig, args)[0]
    assert (cfg.out, cfg.ds_config, cfg.seed) == (str(tmp_path / "from-yaml"), "ds_configs/zero3_offload.json", 3)


@timeout_above(SLURM_START, IDENTIFY_JOB)
def test_sbatch_identify(identify_job):
    out, fields = identify_job["out"], identify_job["fields"]
    assert fields["JobState"] == "COMPLETED", f"{fields}\n{read_log(out)[-4000:]}"
    meta = json.loads((out / "neurons.json").read_text())
    assert meta["world_size"] == 2 and meta["selected_neurons"] > 0
    for name in ("neurons.safetensors", "stats.safetensors", "sets/lang-en/neurons.json"):
        assert (out / name).is_file(), name
    assert len(events_files(out / "tb")) == 1
    assert "identify/param_fraction" in scalar_tags(out / "tb")


@timeout_above(SLURM_START, IDENTIFY_JOB, TRAIN_JOB)
def test_sbatch_train_70b_scaled_down(train_job):
    out, fields = train_job["out"], train_job["fields"]
    log = read_log(out)
    assert fields["JobState"] == "COMPLETED" and fields["Restarts"] == "0", f"{fields}\n{log[-4000:]}"
    assert "srun --nodes=1 --ntasks-per-node=2 --ntasks=2" in log
    assert (out / "model" / "model.safetensors").is_file() and (out / "shield_patch.safetensors").is_file()
    summary = json.loads((out / "train.json").read_text())
    assert summary["steps"] == TRAIN_STEPS and summary["world_size"] == 2
    assert len(events_files(out / "tb")) == 1
    assert {"train/loss_harmful", "train/loss_benign", "train/lr"} <= scalar_tags(out / "tb")


@timeout_above(SLURM_START, IDENTIFY_JOB, TRAIN_JOB, SBATCH, 480, 60, 480)
def test_train_signalled_requeues_and_resumes_bit_identical(identify_job, train_job, tiny_env, tmp_path):
    """USR1 to the batch shell mid-run -> checkpoint, exit 3 -> scontrol requeue -> --resume -> same weights."""
    assert train_job["fields"]["JobState"] == "COMPLETED"
    out = tmp_path / "train"
    # The ranks wait after step 1 (and its checkpoint) until the signal reaches them: the tiny run is too
    # fast to catch between two polls otherwise.
    job = submit_train(identify_job, out, dict(tiny_env, SHIELD_DS_FAULT_PAUSE="1:300"))
    # Signal once step 1's checkpoint is complete: the handler is installed and 11 steps remain.
    first = out / "checkpoints" / "step-00000001" / "COMPLETE"
    deadline = time.monotonic() + 480
    while not first.exists():
        fields = job_fields(job, tiny_env)
        if fields.get("JobState") in DONE or time.monotonic() > deadline:
            subprocess.run(["scancel", job], env=tiny_env, timeout=60)
            pytest.fail(f"no step-1 checkpoint: {fields}\n{read_log(out)[-4000:]}")
        time.sleep(0.2)
    run_cmd(["scancel", "--batch", "--signal=USR1", job], env=tiny_env, timeout=60)
    fields = wait_job(job, tiny_env, timeout=480,
                      until=lambda f: f.get("JobState") in DONE and f.get("Restarts") == "1")
    log = read_log(out)
    assert fields["JobState"] == "COMPLETED", f"{fields}\n{log[-4000:]}"
    stopped = re.search(r"stopping at step (\d+) for requeue", log)
    assert stopped and 1 <= int(stopped.group(1)) < TRAIN_STEPS, log[-4000:]
    # srun --kill-on-bad-exit: the first rank out with code 3 makes srun kill the other (143); the marker decides
    assert re.search(r"ranks exited with code (3|143)\b", log) and "requeueing job" in log and "--resume" in log
    assert not list((out.parent / "logs").glob(".requeue-*"))  # the marker is consumed
    assert f"resumed from {out / 'checkpoints'}/step-{int(stopped.group(1)):08d}" in log, log[-4000:]
    assert json.loads((out / "train.json").read_text())["steps"] == TRAIN_STEPS
    reference = load_file(str(train_job["out"] / "model" / "model.safetensors"))
    resumed = load_file(str(out / "model" / "model.safetensors"))
    assert reference.keys() == resumed.keys()
    for key in reference:
        assert torch.equal(reference[key], resumed[key]), key
    patch_a = load_file(str(train_job["out"] / "shield_patch.safetensors"))
    patch_b = load_file(str(out / "shield_patch.safetensors"))
    assert patch_a.keys() == patch_b.keys() and all(torch.equal(patch_a[k], patch_b[k]) for k in patch_a)


@timeout_above(SLURM_START, SBATCH, 120)
def test_a_dead_rank_ends_the_job_at_once(slurm, tmp_path):
    """Rank 1 exits 1 while rank 0 is stuck for 10 minutes (as in a collective with a dead NCCL peer):
    srun --kill-on-bad-exit=1 (the default of slurm/common.sh) ends the job within seconds."""
    out = tmp_path / "run"
    env = dict(slurm, SHIELD_DS_FAULT_EXIT="1:600")
    job = sbatch([*SCALED_DOWN, f"--output={tmp_path}/slurm-%j.out", "slurm/selfcheck.sh", "--out", str(out)], env)
    fields = wait_job(job, env, timeout=120)
    log = read_log(out)
    assert fields["JobState"] == "FAILED" and fields["Restarts"] == "0", f"{fields}\n{log[-4000:]}"
    assert "fault injection: rank 1 exits with code 1" in log and "requeueing" not in log


@timeout_above(SLURM_START, IDENTIFY_JOB, SBATCH, 300)
def test_crashed_rank_fails_the_job_without_requeue(identify_job, tiny_env, tmp_path):
    """kill -9 of rank 1 mid-step of a real training job: the job fails, a crash is not taken for a
    preemption (no marker, no requeue) and nothing is exported. (Here gloo notices the dead peer by
    itself; test_a_dead_rank_ends_the_job_at_once covers peers that would not.)"""
    out = tmp_path / "crash"
    job = submit_train(identify_job, out, dict(tiny_env, SHIELD_DS_FAULT_KILL="1:2"))
    fields = wait_job(job, tiny_env, timeout=300)
    log = read_log(out)
    assert fields["JobState"] == "FAILED" and fields["Restarts"] == "0", f"{fields}\n{log[-4000:]}"
    assert "fault injection: SIGKILL rank 1" in log and "requeueing" not in log
    assert not (out / "model").exists() and not list((out.parent / "logs").glob(".requeue-*"))


@timeout_above(SLURM_START, SBATCH, 120, 60, 240)
def test_requeue_on_pre_timeout_signal(slurm, tmp_path):
    """USR1 to the batch shell (what --signal=B:USR1@600 sends) -> ranks exit 3 -> requeue -> --resume."""
    out = tmp_path / "run"
    job = sbatch([*SCALED_DOWN, f"--output={tmp_path}/slurm-%j.out", "slurm/selfcheck.sh", "--out", str(out),
                  "--wait-for-preemption", "180"], slurm)
    # Signal once both ranks are in their step loop.
    waiting = "selfcheck waiting up to"
    wait_job(job, slurm, timeout=120, until=lambda f: waiting in read_log(out)
             or f.get("JobState") in DONE)
    run_cmd(["scancel", "--batch", "--signal=USR1", job], env=slurm, timeout=60)
    fields = wait_job(job, slurm, timeout=240,
                      until=lambda f: f.get("JobState") in DONE and f.get("Restarts") == "1")
    log = read_log(out)
    assert fields["JobState"] == "COMPLETED", f"{fields}\n{log[-4000:]}"
    assert "outcome preempted" in log and re.search(r"ranks exited with code (3|143)\b", log)
    assert "requeueing job" in log
    assert "selfcheck resume: restart 1, resume path taken" in log
    summary = json.loads((out / "selfcheck.json").read_text())
    assert summary["restart_count"] == 1 and summary["resumed"] and summary["outcome"] == "finished"
    assert summary["previous"] == {"outcome": "preempted", "restart_count": 0, "slurm_job_id": job}


def submit(args: list[str], env: dict[str, str], timeout: float = 300, recipe: str = "selfcheck") -> tuple[str, str]:
    proc = run_cmd([PYTHON, "recipes/submit.py", recipe, "--cpu", "--gpus-per-node", "2", "--time", "10",
                    *args], env=env, timeout=timeout)
    job = re.search(r"as job (\d+)", proc.stdout).group(1)
    return job, proc.stdout


@timeout_above(SLURM_START, IDENTIFY_JOB, 600, 120)
def test_submitit_identify(tiny_env, identify_job, tmp_path):
    """A real recipe through submitit's Slurm executor: the same identification as slurm/identify.sh."""
    out = tmp_path / "identify"
    # --time 30: submitit's pre-timeout signal comes at half of a short limit, and identify does not resume.
    job, stdout = submit(["--out", str(out), "--wait", "--time", "30", "--", "--ds-config", "ds_configs/zero3_infer.json",
                          *IDENTIFY_ARGS], tiny_env, timeout=600, recipe="identify")
    assert "finished: exit codes [0, 0]" in stdout, stdout
    # submitit reads the results as the tasks end; Slurm marks the job done a moment later.
    assert wait_job(job, tiny_env, timeout=120)["JobState"] == "COMPLETED"
    meta = json.loads((out / "neurons.json").read_text())
    assert meta["world_size"] == 2
    # Same ranks, data and config as the sbatch job: the same neurons.
    sbatch_set = load_file(str(identify_job["out"] / "neurons.safetensors"))
    submitit_set = load_file(str(out / "neurons.safetensors"))
    assert all(torch.equal(sbatch_set[k], submitit_set[k]) for k in sbatch_set)


@timeout_above(SLURM_START, 300, 120, 60, 240)
def test_submitit_requeue_resumes(slurm, tmp_path):
    """submitit's signal -> the recipe exits 3 -> RecipeTask.checkpoint() adds --resume -> requeued run resumes."""
    out = tmp_path / "run"
    job, _ = submit(["--out", str(out), "--", "--wait-for-preemption", "180"], slurm)
    logs = tmp_path / "logs" / "submitit" / job

    def started(fields):
        rank0 = logs / f"{job}_0_log.out"
        return (rank0.exists() and "selfcheck waiting up to" in rank0.read_text()) or fields.get("JobState") in DONE

    wait_job(job, slurm, timeout=120, until=started)
    run_cmd(["scancel", "--signal=USR2", job], env=slurm, timeout=60)
    fields = wait_job(job, slurm, timeout=240,
                      until=lambda f: f.get("JobState") in DONE and f.get("Restarts") == "1")
    text = (logs / f"{job}_0_log.out").read_text()
    assert fields["JobState"] == "COMPLETED", f"{fields}\n{text[-4000:]}"
    assert "selfcheck resume: restart 1, resume path taken" in text, text[-4000:]
    # The first attempt's outcome from the run directory, not from its log: once in CI the rank-0 log held
    # only the requeued attempt's lines (cause not found; sbatch's --open-mode=append is set).
    summary = json.loads((out / "selfcheck.json").read_text())
    assert summary["restart_count"] == 1 and summary["resumed"] and summary["outcome"] == "finished"
    assert summary["previous"] == {"outcome": "preempted", "restart_count": 0, "slurm_job_id": job}
