"""The recipes as users launch them: identify, train and evaluate under `deepspeed --num_gpus N` (issue #29).

    python benchmarks/launch_bench.py                 # 2 CPU ranks, the embedded default (tiny LLaVA)
    python benchmarks/launch_bench.py --rounds 2 --json benchmarks/results-launch.json

Each stage is the recipe itself, started by the real deepspeed launcher with the recipe's defaults
(the embedded default model and data; only the output directory, train's step count and evaluate's
prompt count are set), in three thread settings of the ranks:
  as launched       no OMP_NUM_THREADS: the recipes' own choice (the node's cores over its ranks on CPU)
  1 thread/rank     OMP_NUM_THREADS=1: the reference
  all cores/rank    --cpu-threads <cores>: every rank as many threads as the machine has cores, what every
                    launch but torchrun and submitit got before the recipes chose (oversubscribed N-fold)
Throughput comes from the stage's own record of its loop (identify: `forward_seconds` in neurons.json;
train: `train_seconds` / steps in train.json; evaluate: `generate_seconds` in evaluate.json), so start-up
and loading are left out. Settings alternate within each round. Ratios are against 1 thread/rank.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(BENCH_DIR))

from run import child_env, remove_shm_buffers  # noqa: E402
from shield_ds.process_group import ToolParser, exit_on_error  # noqa: E402
from shield_ds.io import read_json, write_json  # noqa: E402
from shield_ds.tables import markdown_table  # noqa: E402
from shield_ds.launch.env import free_local_port  # noqa: E402

SETTINGS = ("as launched", "1 thread/rank", "all cores/rank")
# stage -> (recipe, extra flags, JSON file, what to read)
STAGES = {
    "identify": ("identify.py", [], "neurons.json"),
    "train": ("train.py", ["--max-steps", "10", "--save-every", "0", "--no-export"], "train.json"),
    "evaluate --zero auto": ("evaluate.py", ["--zero", "auto", "--modalities", "text", "--per-group-limit", "40",
                                             "--max-new-tokens", "32"], "evaluate.json"),
    "evaluate --zero on": ("evaluate.py", ["--zero", "on", "--modalities", "text", "--per-group-limit", "40",
                                           "--max-new-tokens", "32"], "evaluate.json"),
}


def setting_env(setting: str) -> tuple[dict[str, str], list[str]]:
    """(environment, extra flags) of a thread setting."""
    env = child_env()
    env.pop("OMP_NUM_THREADS", None)
    if setting == "1 thread/rank":
        env["OMP_NUM_THREADS"] = "1"
        return env, []
    if setting == "all cores/rank":
        return env, ["--cpu-threads", str(len(os.sched_getaffinity(0)))]
    return env, []


def run_stage(stage: str, setting: str, work: Path, ranks: int, identify_dir: Path, timeout: float) -> dict:
    recipe, flags, result = STAGES[stage]
    env, thread_flags = setting_env(setting)
    out = work / f"{stage.replace(' ', '_')}-{setting.replace(' ', '_').replace('/', '-')}"
    shutil.rmtree(out, ignore_errors=True)
    extra = ["--neurons", str(identify_dir)] if stage == "train" else []
    port = free_local_port()
    cmd = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", str(ranks), "--master_port", str(port),
           str(REPO / "recipes" / recipe), "--out", str(out), *flags, *extra, *thread_flags]
    started = time.perf_counter()
    with open(f"{out}.log", "w", encoding="utf-8") as log:
        try:
            code = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            code = f"timeout after {timeout:.0f}s"
        finally:
            remove_shm_buffers(port)
    if code != 0:
        tail = Path(f"{out}.log").read_text(encoding="utf-8", errors="replace").splitlines()[-30:]
        sys.exit(f"{stage} ({setting}) failed ({code}): {' '.join(cmd)}\n" + "\n".join(tail))
    record = read_json(out / result)
    print(f"  {stage} [{setting}]: {time.perf_counter() - started:.0f}s wall, threads {record['threads']}",
          file=sys.stderr, flush=True)
    return record


def measure_of(stage: str, record: dict) -> float:
    """Seconds of the stage's loop per unit of work (lower is better): per record, per step, per answer."""
    if stage == "identify":
        return record["forward_seconds"] / sum(group["records"] for group in record["groups"].values())
    if stage == "train":
        return record["train_seconds"] / record["steps"]
    return record["generate_seconds"] / (record["asr"]["harmful_n"] + record["asr"]["benign_n"])


UNITS = {"identify": "ms / record", "train": "s / step"}


def table(runs: dict[str, dict[str, list[dict]]]) -> str:
    """Per stage: each setting's median time per unit of work and the two ratios against 1 thread/rank."""
    body = []
    for stage, per_setting in runs.items():
        scale = 1000.0 if stage != "train" else 1.0
        value = {s: statistics.median(measure_of(stage, r) for r in rows) * scale for s, rows in per_setting.items()}
        ref = value["1 thread/rank"]
        body.append([stage, UNITS.get(stage, "ms / answer"), *(f"{value[s]:.2f}" for s in SETTINGS),
                     f"{value['as launched'] / ref:.2f}", f"{value['all cores/rank'] / ref:.2f}"])
    return markdown_table(["stage", "unit", *SETTINGS, "as launched / 1 thread", "all cores / 1 thread"], body)


@exit_on_error
def main(argv: list[str] | None = None) -> None:
    p = ToolParser(prog="python benchmarks/launch_bench.py", description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated: {', '.join(STAGES)}")
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--work-dir", default="/tmp/shield-ds-bench/launch")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        p.error(f"--stages: unknown {', '.join(unknown)} (known: {', '.join(STAGES)})")
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    identify_dir = work / "identify-for-train"
    if "train" in stages and not (identify_dir / "neurons.json").is_file():
        run_stage("identify", "1 thread/rank", work, args.ranks, work / "unused", args.timeout)
        shutil.move(str(work / "identify-1_thread-rank"), identify_dir)
    runs: dict[str, dict[str, list[dict]]] = {s: {t: [] for t in SETTINGS} for s in stages}
    load_before = os.getloadavg()
    for round_index in range(args.rounds):
        order = SETTINGS if round_index % 2 == 0 else tuple(reversed(SETTINGS))
        for stage in stages:
            for setting in order:
                runs[stage][setting].append(run_stage(stage, setting, work, args.ranks, identify_dir, args.timeout))
    cores = len(os.sched_getaffinity(0))
    print(f"\nrecipes under `deepspeed --num_gpus {args.ranks}` on {cores} cores, {args.rounds} round(s); "
          f"load average {load_before[0]:.1f} -> {os.getloadavg()[0]:.1f}; lower is faster\n")
    print(table(runs))
    if args.json:
        write_json(args.json, {"ranks": args.ranks, "cores": cores, "rounds": args.rounds,
                               "load_average": [load_before, os.getloadavg()],
                               "runs": {stage: {s: [{k: r.get(k) for k in ("threads", "forward_seconds", "train_seconds",
                                                                          "steps", "generate_seconds")}
                                                    for r in rows] for s, rows in per.items()}
                                        for stage, per in runs.items()}})


if __name__ == "__main__":
    main()
