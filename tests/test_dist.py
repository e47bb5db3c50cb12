"""The collectives' home: device per backend, and no collective called anywhere else."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch

from shield_ds import dist
from shield_ds.errors import ShieldError
from shield_ds.train import rank_rng_state, rng_state, set_rng_state
from conftest import assert_one_line_error, child_env, run_deepspeed, run_python

REPO = Path(__file__).resolve().parents[1]
COLLECTIVE = re.compile(r"\b(torch\.distributed|torch_dist|dist)\.(all_reduce|all_gather|all_gather_object|"
                        r"all_gather_into_tensor|broadcast|broadcast_object_list|reduce|reduce_scatter|"
                        r"reduce_scatter_tensor|all_to_all|all_to_all_single|gather|scatter|gather_object|"
                        r"scatter_object_list|barrier|send|recv|isend|irecv)\(")


def test_no_collective_outside_dist_module():
    offenders = []
    for path in [*REPO.glob("shield_ds/**/*.py"), *REPO.glob("recipes/*.py"), *REPO.glob("benchmarks/*.py")]:
        if path == REPO / "shield_ds" / "dist.py":
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            match = COLLECTIVE.search(line)
            # shield_ds.dist's own helpers are the allowed way in: dist.all_reduce(...) etc.
            if match and not (match.group(1) == "dist" and hasattr(dist, match.group(2))):
                offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not offenders, "collectives outside shield_ds/dist.py:\n" + "\n".join(offenders)


def test_the_checker_sees_a_direct_call():
    assert COLLECTIVE.search("    torch_dist.all_reduce(x)")
    assert COLLECTIVE.search("torch.distributed.broadcast(t, 0)")
    assert not COLLECTIVE.search("dist.is_rank0()")


def test_collective_device_per_backend():
    assert dist.collective_device("nccl", cuda_index=3) == torch.device("cuda", 3)
    assert dist.collective_device("NCCL", cuda_index=0).type == "cuda"
    assert dist.collective_device("gloo") == torch.device("cpu")
    assert dist.collective_device("mpi") == torch.device("cpu")


def test_collectives_without_a_process_group_are_identities():
    t = torch.tensor([1.0, 2.0])
    assert dist.all_reduce(t, op="max") is t and t.tolist() == [1.0, 2.0]
    assert dist.all_gather_object({"a": 1}) == [{"a": 1}]


def test_rng_state_round_trip_and_per_rank_choice():
    state = rng_state()
    first = torch.rand(3)
    set_rng_state(state)
    assert torch.equal(torch.rand(3), first)
    if torch.cuda.is_available():
        assert "cuda" in state or not torch.cuda.is_initialized()
    # a checkpoint holds one state per rank; a world-size change falls back to rank 0's
    assert rank_rng_state([{"r": 0}]) == {"r": 0}
    assert rank_rng_state({"old": 1}) == {"old": 1}
    assert rank_rng_state([{"r": 0}, {"r": 1}]) == {"r": 0}  # world size 1 here: rank 0's


ERROR_SCRIPT = """
import atexit, sys
sys.path.insert(0, {repo!r})
from shield_ds.process_group import init_distributed
from shield_ds.errors import ShieldError
from shield_ds.process_group import exit_on_error

@exit_on_error
def main():
    init_distributed()
    atexit.register(lambda: print("interpreter teardown ran", flush=True))
    raise ShieldError("bad input on rank " + __import__("os").environ["RANK"])

main()
"""


def _error_script(tmp_path) -> str:
    script = tmp_path / "fail.py"
    script.write_text(ERROR_SCRIPT.format(repo=str(REPO)))
    return str(script)


def test_user_error_after_init_skips_interpreter_teardown(tmp_path):
    """A user error with a process group up exits 2 through os._exit, past the interpreter's teardown,
    where gloo's threads once aborted the process ("terminate called without an active exception": exit
    -6 instead of 2, once in CI). The atexit marker shows whether the teardown ran."""
    proc = run_python([_error_script(tmp_path)], timeout=120, check=False)
    assert_one_line_error(proc, "bad input on rank 0")
    assert "interpreter teardown ran" not in proc.stdout + proc.stderr


@pytest.mark.distributed
def test_user_error_on_two_ranks_exits_without_a_collective(tmp_path):
    """Both ranks fail (no barrier on the error path, so neither waits for the other) and skip the teardown."""
    proc = run_deepspeed(_error_script(tmp_path), [], num_ranks=2, timeout=180, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert "error: bad input on rank" in out and "interpreter teardown ran" not in out, out[-3000:]


# --- intra-op threads per rank ---------------------------------------------------------------------------
def test_threads_per_rank_divides_the_node_cores():
    assert [dist.threads_per_rank(2, n) for n in (1, 2, 3)] == [2, 1, 1]
    assert [dist.threads_per_rank(12, n) for n in (1, 2, 3)] == [12, 6, 4]


@pytest.mark.parametrize("local_ranks", [1, 2, 3])
def test_thread_choice_on_a_cpu_backend(local_ranks):
    shared = [set(range(12))] * local_ranks  # every rank may run on all 12 cores (deepspeed, mpirun)
    choice = dist.choose_threads(None, {}, shared, on_gpu=False, torch_default=12)
    assert (choice.threads, choice.source, choice.cores, choice.local_ranks) == \
        (12 // local_ranks, "cores / local ranks", 12, local_ranks)
    # Slurm's --cpu-bind gives each task its own cores: their union is the node's share, divided again
    bound = [set(range(4 * i, 4 * i + 4)) for i in range(local_ranks)]
    assert dist.choose_threads(None, {}, bound, on_gpu=False, torch_default=12).threads == 4


def test_thread_choice_precedence():
    node = [set(range(8))] * 2
    assert dist.choose_threads(3, {"OMP_NUM_THREADS": "1"}, node, False, 8).as_dict() == \
        {"threads": 3, "source": "--cpu-threads", "cores": 8, "local_ranks": 2}
    omp = dist.choose_threads(None, {"OMP_NUM_THREADS": "2"}, node, False, 8)
    assert (omp.threads, omp.source) == (2, "OMP_NUM_THREADS")
    gpu = dist.choose_threads(None, {}, node, on_gpu=True, torch_default=8)
    assert (gpu.threads, gpu.source) == (8, "torch default")
    with pytest.raises(ShieldError, match="OMP_NUM_THREADS='many'"):
        dist.choose_threads(None, {"OMP_NUM_THREADS": "many"}, node, False, 8)
    with pytest.raises(ShieldError, match="--cpu-threads"):
        dist.choose_threads(0, {}, node, False, 8)


THREADS_SCRIPT = """
import json, os, sys
sys.path.insert(0, {repo!r})
import torch
from shield_ds import dist
from shield_ds.process_group import exit_distributed, init_distributed

init_distributed()
# one write per line: the two ranks share the launcher's stdout
sys.stdout.write("THREADS " + json.dumps({{"rank": dist.rank(), "torch": torch.get_num_threads(),
                                           **dist.thread_choice()}}) + "\\n")
sys.stdout.flush()
exit_distributed(0)
"""


@pytest.mark.distributed
def test_two_ranks_as_users_launch_them_share_the_cores(tmp_path):
    """Under the deepspeed launcher with no OMP_NUM_THREADS, each of 2 ranks takes half the cores."""
    script = tmp_path / "threads.py"
    script.write_text(THREADS_SCRIPT.format(repo=str(REPO)))
    env = child_env()
    env.pop("OMP_NUM_THREADS")
    proc = run_deepspeed(script, [], num_ranks=2, timeout=180, env=env)
    rows = [json.loads(line.split("THREADS ", 1)[1]) for line in proc.stdout.splitlines() if "THREADS {" in line]
    cores = len(os.sched_getaffinity(0))
    assert sorted(row["rank"] for row in rows) == [0, 1], proc.stdout[-3000:]
    for row in rows:
        assert row["source"] == "cores / local ranks" and row["local_ranks"] == 2 and row["cores"] == cores
        assert row["threads"] == row["torch"] == max(1, cores // 2)
    assert "intra-op CPU threads per rank: " in proc.stderr, proc.stderr[-3000:]
