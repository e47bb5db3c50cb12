"""Submit a recipe to Slurm (or run it locally) with submitit, one task per GPU.

    python recipes/submit.py train --nodes 2 --gpus-per-node 8 --time 720 -- --model M --neurons N

Each task exports the torch.distributed variables from submitit's view of the job
(`TorchDistributedEnvironment().export(set_cuda_visible_devices=False)`: every rank sees all GPUs
of its node and picks one by LOCAL_RANK, as with srun and the deepspeed launcher), then runs the
recipe file as `__main__` in the same process with the given arguments.

Timeouts and preemption: submitit sends its signal (SIGUSR2) before the time limit; the recipe's
PreemptionHandler catches it on every rank (see shield_ds.launch.preemption), saves a checkpoint
and exits with REQUEUE_EXIT_CODE. The task then hands the signal back to submitit on rank 0, which
calls `RecipeTask.checkpoint()` (the same recipe with --resume) and requeues the job. A recipe
that ignores the signal is requeued by submitit directly and resumes from its last periodic checkpoint.
"""

from __future__ import annotations

import argparse
import os
import runpy
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

from shield_ds.dist import get_logger
from shield_ds.errors import ShieldError
from shield_ds.launch.preemption import REQUEUE_EXIT_CODE
from shield_ds.process_group import hosted_recipe

REPO = Path(__file__).resolve().parents[2]
RECIPES = {name: REPO / "recipes" / f"{name}.py" for name in ("identify", "train", "evaluate", "selfcheck")}
# Recipes that accept --resume (continue from their latest checkpoint).
RESUMABLE = {"train", "selfcheck"}

log = get_logger("launch")


def with_resume(recipe: str, args: list[str]) -> list[str]:
    """`args` plus --resume when the recipe can resume and it is not there yet."""
    if recipe in RESUMABLE and "--resume" not in args:
        return [*args, "--resume"]
    return list(args)


def with_out(args: list[str], out: str | os.PathLike) -> list[str]:
    """`args` plus `--out OUT` unless they name an output already."""
    if any(arg == "--out" or arg.startswith("--out=") for arg in args):
        return list(args)
    return [*args, "--out", str(out)]


@dataclass
class RecipeTask:
    """A picklable callable that runs one recipe on one rank of a submitit job."""

    recipe: str
    args: list[str] = field(default_factory=list)

    def __call__(self) -> int:
        import submitit

        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        # submitit's own handler for its signal: the recipe's PreemptionHandler replaces it while
        # the recipe runs; it is called again below to checkpoint and requeue.
        submitit_signal = getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"))
        submitit_handler = signal.getsignal(submitit_signal)
        code = run_recipe(self.recipe, self.args)
        if code == REQUEUE_EXIT_CODE:
            signal.signal(submitit_signal, submitit_handler)
            if int(os.environ.get("RANK", "0")) == 0:
                log.warning("%s stopped for preemption: requeueing through submitit", self.recipe)
                signal.raise_signal(submitit_signal)  # checkpoint() + scontrol requeue, then exits
            return code
        if code != 0:
            raise RuntimeError(f"recipes/{self.recipe}.py exited with code {code}")
        return code

    def checkpoint(self, *args, **kwargs):
        """Called by submitit before a requeue: run the same recipe again, resuming."""
        import submitit

        return submitit.helpers.DelayedSubmission(RecipeTask(self.recipe, with_resume(self.recipe, self.args)))


def run_recipe(recipe: str, args: list[str]) -> int:
    """Run recipes/RECIPE.py as __main__ in this process with `args`; return its exit code."""
    path = RECIPES[recipe]
    if not path.exists():
        raise ShieldError(f"{path} does not exist")
    saved_argv = sys.argv
    sys.argv = [str(path), *args]
    try:
        with hosted_recipe():
            runpy.run_path(str(path), run_name="__main__")
        return 0
    except SystemExit as exc:
        if exc.code is None:
            return 0
        return exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.argv = saved_argv


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="recipes/submit.py",
        description="Submit a shield-ds recipe with submitit: one task per GPU. "
                    "Arguments after -- go to the recipe.",
        usage="%(prog)s RECIPE [options] [-- RECIPE_ARGS...]")
    parser.add_argument("recipe", choices=sorted(RECIPES))
    parser.add_argument("--cluster", choices=["slurm", "local"], default=None,
                        help="default: slurm where sbatch exists, else local")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=8, help="also the number of ranks per node")
    parser.add_argument("--cpu", action="store_true",
                        help="ranks without GPUs: ask for no GPUs, still --gpus-per-node ranks per node")
    parser.add_argument("--cpus-per-task", type=int, default=None, help="default 8 (1 with --cpu)")
    parser.add_argument("--partition", default=None)
    parser.add_argument("--account", default=None)
    parser.add_argument("--time", type=int, default=12 * 60, help="time limit in minutes")
    parser.add_argument("--signal-delay", type=int, default=600,
                        help="seconds before the time limit at which the job is told to save and stop")
    parser.add_argument("--max-requeues", type=int, default=10, help="timeouts to requeue after")
    parser.add_argument("--out", default=None, help="run directory (default runs/RECIPE); passed to the "
                        "recipe as --out unless its arguments have one; submitit logs go to logs/submitit/JOB "
                        "beside it (not inside: identify and evaluate write OUT as a whole)")
    parser.add_argument("--name", default=None, help="job name (default shield-RECIPE)")
    parser.add_argument("--wait", action="store_true", help="wait for the job and exit with its outcome "
                        "(always on for --cluster local)")
    argv = list(sys.argv[1:] if argv is None else argv)
    recipe_args: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, recipe_args = argv[:split], argv[split + 1:]
    args = parser.parse_args(argv)
    args.recipe_args = recipe_args
    return args


def submitit_folder(out: str | os.PathLike) -> Path:
    """Where submitit keeps a job's pickles and logs: logs/submitit beside the run directory OUT."""
    return Path(out).parent / "logs" / "submitit"


def make_executor(args: argparse.Namespace):
    """A submitit AutoExecutor for these arguments (one task per GPU)."""
    import shutil

    import submitit

    cluster = args.cluster or ("slurm" if shutil.which("sbatch") else "local")
    out = Path(args.out or REPO / "runs" / args.recipe)
    executor = submitit.AutoExecutor(folder=submitit_folder(out) / "%j", cluster=cluster,
                                     slurm_max_num_timeout=args.max_requeues)
    gpus = 0 if args.cpu else args.gpus_per_node
    params = dict(name=args.name or f"shield-{args.recipe}", nodes=args.nodes, tasks_per_node=args.gpus_per_node,
                  gpus_per_node=gpus, cpus_per_task=args.cpus_per_task or (1 if args.cpu else 8),
                  timeout_min=args.time)
    signal_delay = min(args.signal_delay, args.time * 60 // 2)
    if signal_delay < args.signal_delay:
        # Slurm would signal right at the start, before the recipe can handle it.
        log.warning("--signal-delay %ss is not below half of --time %s min: using %ss",
                    args.signal_delay, args.time, signal_delay)
    if cluster == "slurm":
        params.update(slurm_signal_delay_s=signal_delay, slurm_additional_parameters={"requeue": True})
        if args.partition:
            params["slurm_partition"] = args.partition
        if args.account:
            params["slurm_account"] = args.account
    elif args.nodes != 1:
        raise ShieldError(f"--cluster local runs on this machine only: --nodes must be 1, got {args.nodes}")
    executor.update_parameters(**params)
    return executor, out, cluster


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    executor, out, cluster = make_executor(args)
    recipe_args = with_out(args.recipe_args, out)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    job = executor.submit(RecipeTask(args.recipe, recipe_args))
    print(f"submitted {args.recipe} as job {job.job_id} on {cluster}: "
          f"{args.nodes} node(s) x {args.gpus_per_node} rank(s); logs {submitit_folder(out) / str(job.job_id)}",
          flush=True)
    if not (args.wait or cluster == "local"):
        return 0
    try:
        results = job.results()
    except Exception as exc:  # submitit re-raises the task's failure with its traceback
        print(f"job {job.job_id} failed: {exc}", file=sys.stderr, flush=True)
        return 1
    print(f"job {job.job_id} finished: exit codes {results}", flush=True)
    return 0
