"""The shield-ds CPU benchmark (issues #7, #14): every ratio from one command, on 2 ranks.

    python benchmarks/run.py                          # tiny and large, 5 measured steps per mode
    python benchmarks/run.py --size tiny --steps 2    # the smoke-test size
    python benchmarks/run.py --size large --rounds 2  # repeat the train modes (alternating order)
    python benchmarks/run.py --parts train --modes delta,lora --rounds 3   # a subset
    python benchmarks/run.py --parts scaling --sizes tiny,mid,large --ranks 1,2   # the scaling table
    python benchmarks/run.py --model runs/models/gemma3-270m --parts identify,train --modes mask,mask-full-logits

For each size it builds (once, cached under --work-dir) a random checkpoint, then starts
`deepspeed --num_gpus RANKS benchmarks/worker.py` once per mode: identify (plain and hooked
forwards and full-logit forwards on one engine), then the train modes ffn, mask, delta, full, lora,
mask-full-logits; then the evaluation
engines in one launch (`evaluate_bench.py`, alternating pass by pass): ZeRO-3 and a replica per
rank, and plain `transformers` generate in one process (rank 0 alone). It prints a markdown ratio table per size and writes all
measurements to benchmarks/results-<date>.json (--json).

The scaling part (issue #14, not in the default parts) runs identify, mask, delta and LoRA for each
of --sizes (tiny ~0.3M, mid ~49M, large ~183M parameters) on each of --ranks rank counts and prints
one table: step time, tokens/s and peak memory per rank, next to the memory planner's
(`shield_ds.plan.plan_memory`) model-state prediction for the same model, mode and ranks.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(BENCH_DIR))

from shield_ds.process_group import ToolParser, exit_on_error  # noqa: E402
from shield_ds.io import write_text  # noqa: E402
from shield_ds.launch.env import free_local_port  # noqa: E402
from shield_ds.models.tiny import build_tiny  # noqa: E402

# Per size: micro-batch per rank, max tokens per sequence, records (cycled through by the steps).
# Evaluation: records, records per generate call, new tokens per answer, timed passes.
SIZES = {
    "tiny": dict(batch_size=2, max_length=128, records=16,
                 eval_records=32, eval_batch_size=8, eval_new_tokens=32, eval_passes=3),
    "mid": dict(batch_size=2, max_length=96, records=8,
                eval_records=16, eval_batch_size=4, eval_new_tokens=16, eval_passes=2),
    "large": dict(batch_size=2, max_length=96, records=8,
                  eval_records=16, eval_batch_size=4, eval_new_tokens=16, eval_passes=2),
}
RATIO_SIZES = ("tiny", "large")  # --size all: the sizes of the ratio tables
PARTS = ("identify", "train", "evaluate", "scaling")
DEFAULT_PARTS = ("identify", "train", "evaluate")
SCALING_MODES = ("identify", "mask", "delta", "lora")
BUILT_MARKER = "BENCH_BUILT"


# DeepSpeed JIT-builds its CPU shm comm op into TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions).
# Checkouts with other venvs sharing that folder rebuild it in turn and every rank waits on the
# build lock (minutes here); a folder private to this venv is built once and then reused.
EXTENSIONS_DIR = str(Path(tempfile.gettempdir()) / f"shield-ds-torch-ext-{hashlib.sha1(sys.prefix.encode()).hexdigest()[:10]}")


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    if "TORCH_EXTENSIONS_DIR" not in env:
        env["TORCH_EXTENSIONS_DIR"] = EXTENSIONS_DIR
    env.update({"OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "1"), "TOKENIZERS_PARALLELISM": "false",
                "PYTHONUNBUFFERED": "1"})
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def run_logged(cmd: list[str], log_path: Path, timeout: float, result: Path | None = None) -> None:
    """Run `cmd` with its output in `log_path`; on failure or timeout show the tail and exit.

    A launch that wrote its `result` file and failed afterwards (gloo's teardown at interpreter exit
    still aborts a rank now and then with "terminate called without an active exception") counts
    as done, with a warning: the measurements were complete and written after a barrier.
    """
    if result is not None:
        result.unlink(missing_ok=True)
    with open(log_path, "w", encoding="utf-8") as log:
        try:
            proc = subprocess.run(cmd, cwd=REPO, env=child_env(), stdout=log, stderr=subprocess.STDOUT,
                                  timeout=timeout)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = f"timeout after {timeout:.0f}s"
    if code != 0 and result is not None and result.is_file() and not isinstance(code, str):
        print(f"  warning: exit {code} after {result.name} was written (see {log_path})", file=sys.stderr, flush=True)
        return
    if code != 0:
        tail = log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-40:]
        sys.exit(f"benchmark step failed ({code}): {' '.join(cmd)}\n" + "\n".join(tail))


def checkpoint(size: str, work_dir: Path, timeout: float) -> Path:
    """The size's random checkpoint, built in a subprocess the first time."""
    out = work_dir / f"{size}-llava"
    if (out / BUILT_MARKER).exists():
        return out
    work_dir.mkdir(parents=True, exist_ok=True)
    run_logged([sys.executable, str(Path(__file__).resolve()), "--build", size, "--work-dir", str(work_dir)],
               work_dir / f"build-{size}.log", timeout)
    return out


def build(size: str, work_dir: Path) -> None:
    out = work_dir / f"{size}-llava"
    if size == "tiny":
        build_tiny("llava", out)
    else:
        import shield_bench

        shield_bench.build_llava(out, size)
    (out / BUILT_MARKER).write_text("ok\n")


def remove_shm_buffers(port: int) -> None:
    """Delete the /dev/shm all-reduce buffers DeepSpeed's CPU shm backend left for our launch.

    deepspeed 0.19.8 never unlinks them (~69 MB per rank and launch, named after the master port),
    so a benchmark of a dozen launches would otherwise leave GBs of shared memory behind.
    """
    for path in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_127.0.0.1_{port}_*"):
        path.unlink(missing_ok=True)


def run_evaluate(model: Path, size: str, args: argparse.Namespace, out_dir: Path) -> dict:
    """The three evaluation engines in one launch (evaluate_bench.py), alternating pass by pass."""
    out = out_dir / "evaluate.json"
    settings = SIZES[size]
    port = free_local_port()
    cmd = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", str(args.ranks), "--master_port", str(port),
           str(BENCH_DIR / "evaluate_bench.py"), "--model", str(model), "--records", str(settings["eval_records"]),
           "--batch-size", str(settings["eval_batch_size"]), "--max-new-tokens", str(settings["eval_new_tokens"]),
           "--max-prompt-bytes", str(settings["max_length"] // 2), "--passes", str(settings["eval_passes"]),
           "--out", str(out)]
    start = time.perf_counter()
    try:
        run_logged(cmd, out_dir / "evaluate.log", args.timeout, result=out)
    finally:
        remove_shm_buffers(port)
    print(f"  {size} evaluate: {time.perf_counter() - start:.0f}s", file=sys.stderr, flush=True)
    return json.loads(out.read_text(encoding="utf-8"))


def settings_of(size: str, args: argparse.Namespace) -> dict:
    """The size's batch settings with --batch-size / --max-length / --records applied."""
    overrides = {k: getattr(args, k, None) for k in ("batch_size", "max_length", "records")}
    return {**SIZES[size], **{k: v for k, v in overrides.items() if v is not None}}


def launch(mode: str, model: Path, size: str, args: argparse.Namespace, out_dir: Path, ranks: int | None = None) -> dict:
    deepspeed = str(Path(sys.executable).with_name("deepspeed"))
    out = out_dir / f"{mode}.json"
    settings = settings_of(size, args)
    port = free_local_port()
    cmd = [deepspeed, "--num_gpus", str(ranks or args.ranks), "--master_port", str(port), str(BENCH_DIR / "worker.py"),
           "--model", str(model), "--mode", mode, "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--batch-size", str(settings["batch_size"]), "--max-length", str(settings["max_length"]),
           "--records", str(settings["records"]), "--out", str(out)]
    start = time.perf_counter()
    try:
        run_logged(cmd, out_dir / f"{mode}.log", args.timeout, result=out)
    finally:
        remove_shm_buffers(port)
    print(f"  {size} {mode} ({ranks or args.ranks} ranks): {time.perf_counter() - start:.0f}s", file=sys.stderr,
          flush=True)
    return json.loads(out.read_text(encoding="utf-8"))


def run_scaling(args: argparse.Namespace) -> list[dict]:
    """Issue #14's scaling table: identify, mask, delta and LoRA for each of --sizes on each of --ranks
    ranks, one launch each; every row carries the planner's model-state prediction next to the measurement."""
    import shield_bench

    work = Path(args.work_dir)
    rows = []
    for size in args.sizes:
        model = checkpoint(size, work, args.timeout)
        for ranks in args.scaling_ranks:
            out_dir = work / f"scaling-{size}-{ranks}ranks"
            out_dir.mkdir(parents=True, exist_ok=True)
            for mode in SCALING_MODES:
                result = launch(mode, model, size, args, out_dir, ranks=ranks)
                rows.append(shield_bench.scaling_row(size, ranks, mode, result, model))
    return rows


def merge_rounds(runs: list[dict]) -> dict:
    """One mode's result over several rounds: all step times pooled, the largest peak."""
    import shield_bench

    merged = dict(runs[0])
    times = [t for r in runs for t in r["step_times_s"]]
    merged.update(shield_bench.summarise(times), step_times_s=times, rounds=len(runs),
                  peak_bytes=max(r["peak_bytes"] for r in runs),
                  baseline_bytes=min(r["baseline_bytes"] for r in runs),
                  tokens_per_s=statistics.median(r["tokens_per_s"] for r in runs))
    return merged


def run_size(size: str, args: argparse.Namespace) -> dict:
    """The identify/train/evaluate parts on the size's generated checkpoint, or on --model with its settings."""
    import shield_bench

    work = Path(args.work_dir)
    model = Path(args.model) if args.model else checkpoint(size, work, args.timeout)
    out_dir = work / (f"run-{size}-{model.name}" if args.model else f"run-{size}")
    out_dir.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    results = {"size": size, "model": str(model), "settings": settings_of(size, args), "steps": args.steps,
               "warmup": args.warmup, "ranks": args.ranks, "rounds": args.rounds}
    if "identify" in args.parts:
        results["identify"] = launch("identify", model, size, args, out_dir)
    if "train" in args.parts:
        per_mode: dict[str, list[dict]] = {m: [] for m in args.modes}
        for round_index in range(args.rounds):
            order = args.modes if round_index % 2 == 0 else tuple(reversed(args.modes))
            for mode in order:
                per_mode[mode].append(launch(mode, model, size, args, out_dir))
        results["train"] = {m: merge_rounds(runs) for m, runs in per_mode.items()}
    if "evaluate" in args.parts:
        results["evaluate"] = run_evaluate(model, size, args, out_dir)
    results["load_average_before"], results["load_average_after"] = load_before, os.getloadavg()
    results["ratios"] = shield_bench.ratio_rows(results)
    return results


def machine() -> dict:
    import deepspeed
    import peft
    import torch
    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("MemTotal"))
    return {"nproc": os.cpu_count(), "cpu": cpu, "ram_gib": round(mem_kb / 2**20, 1), "python": platform.python_version(),
            "torch": torch.__version__, "deepspeed": deepspeed.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "device": "cpu (gloo)"}


@exit_on_error
def main(argv: list[str] | None = None) -> None:
    p = ToolParser(prog="python benchmarks/run.py", description=__doc__,
                   formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="all", choices=[*SIZES, "all"],
                   help=f"model size of the identify/train/evaluate parts (all: {', '.join(RATIO_SIZES)})")
    p.add_argument("--sizes", default=",".join(SIZES), help="comma-separated model sizes of the scaling part")
    p.add_argument("--model", default=None, help="a checkpoint directory to measure instead of the generated ones, "
                                                 "with the batch settings of --size (default large); text prompts")
    p.add_argument("--steps", type=int, default=5, help="measured steps per mode (after --warmup)")
    p.add_argument("--batch-size", type=int, default=None, help="micro-batch per rank (default: the size's)")
    p.add_argument("--max-length", type=int, default=None, help="tokens per sequence at most; prompts of at most "
                                                               "half as many UTF-8 bytes (default: the size's)")
    p.add_argument("--records", type=int, default=None, help="records the steps cycle through (default: the size's)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=1, help="run the train modes this many times (order alternates)")
    p.add_argument("--ranks", default=None, help="ranks (default 2); the scaling part takes a comma-separated "
                                                 "list (default 1,2)")
    p.add_argument("--parts", default=",".join(DEFAULT_PARTS),
                   help=f"comma-separated subset of {','.join(PARTS)} (default {','.join(DEFAULT_PARTS)})")
    p.add_argument("--modes", default=None, help="comma-separated train modes (default: all, "
                                                  "ffn,mask,delta,full,lora,mask-full-logits)")
    p.add_argument("--work-dir", default=os.environ.get("SHIELD_DS_BENCH_DIR", "/tmp/shield-ds-bench"),
                   help="checkpoints (cached), per-mode logs and JSON")
    p.add_argument("--json", default=None, help="results file (default benchmarks/results-<date>.json)")
    p.add_argument("--timeout", type=float, default=900, help="seconds per launcher call")
    p.add_argument("--build", choices=list(SIZES), help=argparse.SUPPRESS)  # internal: build one checkpoint
    args = p.parse_args(argv)
    if args.build:
        build(args.build, Path(args.work_dir))
        return
    import shield_bench

    args.parts = [part for part in args.parts.split(",") if part]
    args.modes = tuple(m for m in (args.modes or ",".join(shield_bench.TRAIN_MODES)).split(",") if m)
    args.sizes = [size for size in args.sizes.split(",") if size]
    unknown = (sorted(set(args.parts) - set(PARTS)) + sorted(set(args.modes) - set(shield_bench.TRAIN_MODES))
               + sorted(set(args.sizes) - set(SIZES)))
    if unknown:
        p.error(f"unknown part, mode or size: {', '.join(unknown)}")
    scaling = "scaling" in args.parts
    ratio_parts = [part for part in args.parts if part != "scaling"]
    try:
        ranks = [int(r) for r in args.ranks.split(",") if r] if args.ranks else [2]
    except ValueError:
        p.error(f"--ranks: expected a comma-separated list of integers, not {args.ranks!r}")
    if not ranks or min(ranks) < 1:
        p.error(f"--ranks: rank counts must be at least 1, not {args.ranks!r}")
    if ratio_parts and len(ranks) > 1:
        p.error(f"--ranks {args.ranks}: the {','.join(ratio_parts)} parts run on one rank count")
    args.ranks, args.scaling_ranks = ranks[0], (ranks if args.ranks else [1, 2])
    if args.model and not (Path(args.model) / "config.json").is_file():
        p.error(f"--model {args.model}: not a checkpoint directory (no config.json)")
    if args.model and args.size == "all":
        args.size = "large"
    sizes = (list(RATIO_SIZES) if args.size == "all" else [args.size]) if ratio_parts else []
    date = time.strftime("%Y-%m-%d")
    report = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join(["python", *sys.argv]),
              "machine": machine(), "sizes": {}}
    start = time.perf_counter()
    for size in sizes:
        report["sizes"][f"{Path(args.model).name} ({size} settings)" if args.model else size] = run_size(size, args)
    if scaling:
        report["scaling"] = run_scaling(args)
    report["wall_s"] = time.perf_counter() - start
    json_path = Path(args.json) if args.json else BENCH_DIR / f"results-{date}.json"
    write_text(json_path, json.dumps(report, indent=2, default=str) + "\n")
    m = report["machine"]
    ranks_text = str(args.ranks) if sizes else ",".join(map(str, args.scaling_ranks))
    print(f"# shield-ds benchmark, {report['date']}\n\n{m['nproc']} CPUs ({m['cpu']}), {m['ram_gib']} GiB RAM, "
          f"{ranks_text} ranks (gloo), {args.steps} measured steps after {args.warmup} warm-up, "
          f"{args.rounds} round(s); wall {report['wall_s']:.0f}s; results in {json_path}")
    for size, res in report["sizes"].items():
        train = next(iter(res.get("train", {}).values()), None)
        what = (f"{train['total_params']:,} parameters, {train['neurons']} neurons "
                f"({train['neuron_param_fraction']:.4%} of parameters), " if train else "")
        print(f"\n## {size}: {what}load average "
              f"{res['load_average_before'][0]:.1f} -> {res['load_average_after'][0]:.1f}\n")
        print(shield_bench.format_ratio_table(res["ratios"]))
        print()
        print(shield_bench.format_mode_table(res))
    if scaling:
        print(f"\n## scaling: sizes {','.join(args.sizes)} on {','.join(map(str, args.scaling_ranks))} ranks\n")
        print(shield_bench.format_scaling_table(report["scaling"]))


if __name__ == "__main__":
    main()
