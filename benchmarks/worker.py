"""One benchmark mode on every rank, started by `benchmarks/run.py` through the deepspeed launcher.

    deepspeed --num_gpus 2 benchmarks/worker.py --model DIR --mode mask --steps 5 --out mask.json

A fresh process group per mode keeps each mode's peak memory free of the others' leftovers.
Rank 0 writes the mode's measurements to --out (JSON).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import shield_bench as sb  # noqa: E402
from shield_ds import dist  # noqa: E402
from shield_ds.process_group import ToolParser, exit_on_error  # noqa: E402
from shield_ds.engine import ShieldEngine, resolve_ds_config  # noqa: E402
from shield_ds.process_group import init_distributed  # noqa: E402
from shield_ds.io import write_json  # noqa: E402
from shield_ds.models import get_adapter, load_config  # noqa: E402

IDENTIFY_CONFIG = "ds_configs/zero3_infer.json"
TRAIN_CONFIG = "ds_configs/zero3_fp32.json"
# zero3_fp32.json leaves the bucket sizes at DeepSpeed's defaults (5e8 elements = 2 GB fp32 per
# bucket per rank), which OOM-killed full fine-tuning of the large model on this 24 GB machine;
# use the sizes zero3_bf16.json ships with, for every mode alike.
BUCKETS = {"zero_optimization.reduce_bucket_size": 50_000_000,
           "zero_optimization.stage3_prefetch_bucket_size": 50_000_000}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ToolParser(prog="python benchmarks/worker.py", description=__doc__,
                   formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint directory")
    p.add_argument("--mode", required=True, choices=["identify", *sb.TRAIN_MODES])
    p.add_argument("--steps", type=int, default=5, help="measured steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=2, help="micro-batch size per rank")
    p.add_argument("--max-length", type=int, default=128, help="tokens per sequence at most")
    p.add_argument("--records", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the launcher
    p.add_argument("--out", required=True, type=Path)
    return p.parse_args(argv)


@exit_on_error
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    init_distributed()
    meter = sb.PeakMemory(dist.device())
    baseline = sb.reduce_max([float(meter.current())])[0]  # the process before the model exists
    torch.manual_seed(args.seed)

    identify = args.mode == "identify"
    ds_config = resolve_ds_config(IDENTIFY_CONFIG if identify else TRAIN_CONFIG, micro_batch_size=args.batch_size,
                                  overrides={"bf16.enabled": False} if identify else BUCKETS)
    config = load_config(args.model)
    neuron_set = None if identify else sb.benchmark_neuron_set(config, get_adapter(config), sb.model_params(config),
                                                               seed=args.seed)
    # The engine the recipes build (HfDeepSpeedConfig, partitioned load, freezing, initialize, masker).
    engine, load_s = sb.timed(lambda: ShieldEngine.load(args.model, ds_config, **sb.engine_args(args.mode, neuron_set)))
    total_params = engine.total_params
    records, source = sb.benchmark_records(args.records, args.data_dir, args.seed, max_prompt_bytes=args.max_length // 2)
    common = dict(batch_size=args.batch_size, max_length=args.max_length, warmup=args.warmup, steps=args.steps,
                  dtype=torch.float32)
    start = time.perf_counter()
    if identify:
        result = sb.run_identify(engine, records, **common)
    else:
        result = sb.run_train(engine, args.mode, records, **common)
        result["neurons"] = neuron_set.count
        result["neuron_param_fraction"] = neuron_set.param_fraction
    result["baseline_bytes"] = int(baseline)
    result.update({"model": str(args.model), "total_params": total_params, "world_size": dist.world_size(),
                   "batch_size": args.batch_size, "max_length": args.max_length, "data": source,
                   "load_s": load_s, "run_s": time.perf_counter() - start, "ds_config": ds_config})
    if dist.is_rank0():
        write_json(args.out, result)
        print(json.dumps({k: v for k, v in result.items() if k not in ("ds_config",)}, default=str)[:2000],
              flush=True)
    dist.barrier()


if __name__ == "__main__":
    main()
