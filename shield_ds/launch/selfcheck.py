"""recipes/selfcheck.py: check the wiring of a cluster before spending GPU hours: ranks, hosts, backend, one all-reduce.

    srun -N 2 --ntasks-per-node 8 python recipes/selfcheck.py          # or: sbatch slurm/selfcheck.sh
    mpirun -np 2 python recipes/selfcheck.py
    deepspeed --num_gpus 2 recipes/selfcheck.py
    python recipes/submit.py selfcheck --nodes 2 --gpus-per-node 8

Every rank prints one line (rank, local rank, host, device); rank 0 prints a summary and, with --out,
writes OUT/selfcheck.json (after a resume, with the attempt before it as "previous"). Exit code 1 when the all-reduce gives a wrong sum.

--wait-for-preemption SECONDS checks the requeue path: the ranks run one-second "steps" until
PreemptionHandler.should_stop() (a signal such as the sbatch pre-timeout SIGUSR1, or
`scontrol requeue`), then exit with REQUEUE_EXIT_CODE like train.py does; when the job comes back
with --resume it reports the restart and finishes.

Testing aid for the crash path: SHIELD_DS_FAULT_EXIT="RANK:SECONDS" makes rank RANK exit with code 1
right after the all-reduce while the other ranks block for SECONDS without talking to it, like ranks
stuck in an NCCL collective whose peer died. Under `srun --kill-on-bad-exit=1` (slurm/common.sh) the
job ends at once; without it, it waits out the SECONDS.
"""

from __future__ import annotations

import argparse
import os
import socket
import time

import torch
import torch.distributed as torch_dist

from shield_ds import dist
from shield_ds.process_group import init_distributed
from shield_ds.launch.env import export_distributed_env
from shield_ds.launch.preemption import REQUEUE_EXIT_CODE, PreemptionHandler, mark_for_requeue, restart_count
from shield_ds.io import read_json, write_json


def run_selfcheck(args: argparse.Namespace) -> int:
    """Run the check with recipes/selfcheck.py's flags (out, size, wait_for_preemption, resume); the exit code."""
    preemption = PreemptionHandler()  # before init: a signal may arrive while ranks rendezvous
    # init_distributed() does this mapping itself; doing it first tells us what the scheduler supplied.
    added = export_distributed_env()
    init_distributed()
    rank, world = torch_dist.get_rank(), torch_dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    host = socket.gethostname()
    backend = torch_dist.get_backend()
    on = dist.collective_device(backend)
    print(f"selfcheck rank {rank}/{world} local_rank {local_rank} host {host} pid {os.getpid()} "
          f"device {on} env_from_scheduler {sorted(added) or 'none'}", flush=True)

    # Each rank contributes its rank everywhere: the sum is 0 + 1 + ... + (world - 1) in every element.
    values = torch.full((args.size,), float(rank), dtype=torch.float32, device=on)
    started = time.perf_counter()
    dist.all_reduce(values)
    seconds = time.perf_counter() - started
    expected = world * (world - 1) / 2
    ok = bool(torch.all(values == expected).item())
    hosts = dist.all_gather_object(host)
    fault = os.environ.get("SHIELD_DS_FAULT_EXIT")
    if fault:
        fault_rank, seconds_stuck = fault.split(":")
        if rank == int(fault_rank):
            print(f"selfcheck fault injection: rank {rank} exits with code 1", flush=True)
            os._exit(1)
        time.sleep(float(seconds_stuck))

    restarts = restart_count()
    outcome = "finished"
    if args.resume:
        if rank == 0:
            print(f"selfcheck resume: restart {restarts}, resume path taken", flush=True)
    elif args.wait_for_preemption > 0:
        if rank == 0:
            print(f"selfcheck waiting up to {args.wait_for_preemption:g}s for a preemption signal", flush=True)
        deadline = time.monotonic() + args.wait_for_preemption
        timed_out = False
        while not preemption.should_stop():
            time.sleep(1.0)
            if time.monotonic() > deadline and not preemption.stop_requested_locally():
                timed_out = True
                preemption.request_stop()  # stop everywhere, and report it as a timeout below
        # Ranks may stop for different reasons: a real signal on any rank means preempted.
        signalled = torch.tensor([int(preemption.stop_requested_locally() and not timed_out)], device=on)
        dist.all_reduce(signalled, op="max")
        outcome = "preempted" if signalled.item() else "timeout"

    summary = {
        "ok": ok, "world_size": world, "backend": backend, "master": f"{os.environ.get('MASTER_ADDR')}:"
        f"{os.environ.get('MASTER_PORT')}", "hosts": hosts, "restart_count": restarts, "resumed": args.resume,
        "outcome": outcome, "allreduce_seconds": round(seconds, 6), "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
    }
    if rank == 0:
        counts = {h: hosts.count(h) for h in dict.fromkeys(hosts)}
        print(f"selfcheck {'ok' if ok else 'FAILED'}: world {world} backend {backend} master {summary['master']} "
              f"hosts {' '.join(f'{h}({n})' for h, n in counts.items())} restarts {restarts} outcome {outcome}",
              flush=True)
        if args.out:
            path = os.path.join(args.out, "selfcheck.json")
            if args.resume and os.path.isfile(path):
                # The attempt before the requeue, kept here: a scheduler's log files may not survive it.
                before = read_json(path)
                summary["previous"] = {k: before.get(k) for k in ("outcome", "restart_count", "slurm_job_id")}
            write_json(path, summary)
        if ok and outcome == "preempted":
            mark_for_requeue()
    dist.barrier()
    torch_dist.destroy_process_group()
    preemption.uninstall()
    if not ok:
        return 1
    if outcome == "preempted":
        if rank == 0:
            print(f"selfcheck: stopping for requeue (exit {REQUEUE_EXIT_CODE})", flush=True)
        return REQUEUE_EXIT_CODE
    if outcome == "timeout":
        if rank == 0:
            print("selfcheck: no preemption signal arrived in time", flush=True)
        return 1
    return 0

