"""The shield-ds GPU benchmark (issue #7): LLaVA-1.5-7B-sized random model, bf16, one GPU.

    python benchmarks/gpu_7b.py                        # one H100/H200, about 5-7 minutes
    python benchmarks/gpu_7b.py --toy --steps 1        # CPU smoke run of the same code path

No download: the architecture is `shield_ds.plan_presets.llava_15_7b()` with random weights, the
processor is the tiny llava byte-level one (text-only batches, so the vision tower never runs).
Every mode runs in turn in this one process (ZeRO-3 with one rank), each on a freshly built
model, with the same ratios as `benchmarks/run.py` plus tokens/s and peak GPU memory
(torch.cuda.max_memory_allocated during the timed steps; "peak - baseline" subtracts what was
allocated before the mode's model was built, which shows any leak from the previous mode).

Depth. Fine-tuning all of a 7B model (bf16 weights + grads, fp32 master + Adam = 16 bytes per
parameter = 113 GB) does not fit one 80 GB GPU, and nor does mask mode's 4.3B trainable FFN
parameters (~75 GB). So the train-mode ratios use the 7B widths (hidden 4096, intermediate 11008,
vocab 32064, CLIP ViT-L vision) with --train-text-layers decoder layers (default 8, ~2.2B
parameters), while identify and the two cheap modes (delta, lora) also run at the full 32 layers.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR.parent))
sys.path.insert(0, str(BENCH_DIR))

import torch  # noqa: E402

import shield_bench as sb  # noqa: E402
from shield_ds import dist  # noqa: E402
from shield_ds.process_group import ToolParser, exit_on_error  # noqa: E402
from shield_ds.io import write_text  # noqa: E402
from shield_ds.engine import ShieldEngine, resolve_ds_config  # noqa: E402
from shield_ds.process_group import init_distributed  # noqa: E402
from shield_ds.models import LoadedModel, count_parameters, get_adapter  # noqa: E402
from shield_ds.models.loader import import_model_classes  # noqa: E402
from shield_ds.models.tiny import BUILDERS  # noqa: E402
from shield_ds.plan_presets import llava_15_7b  # noqa: E402


def with_text_layers(config, layers: int):
    """A copy of a LLaVA config with `layers` decoder layers in its language model."""
    config = copy.deepcopy(config)
    text = config.text_config
    text.num_hidden_layers = layers
    if isinstance(getattr(text, "layer_types", None), list):
        text.layer_types = text.layer_types[:layers]
    return config


def base_config(toy: bool):
    """(config, processor): the LLaVA-1.5-7B preset, or the tiny llava config with --toy."""
    tiny_config, processor = BUILDERS["llava"]("llava")
    return (tiny_config if toy else llava_15_7b()), processor


def build_model(config, processor, ds_config: dict, dtype: torch.dtype):
    """Random weights, created partitioned under ZeRO-3 (transformers' zero.Init path), as the
    `LoadedModel` that `ShieldEngine` wraps (`load_model` reads a checkpoint; there is none here)."""
    from transformers import AutoModelForImageTextToText
    from transformers.integrations import HfDeepSpeedConfig


    import_model_classes(config, AutoModelForImageTextToText)  # outside zero.Init (see its docstring)
    hf_ds_config = HfDeepSpeedConfig(ds_config)  # must exist before the model is created
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config, dtype=dtype)
    return LoadedModel(model, processor, get_adapter(model.config), model.config, path="(random)",
                       hf_ds_config=hf_ds_config)


@exit_on_error
def main(argv: list[str] | None = None) -> None:
    p = ToolParser(prog="python benchmarks/gpu_7b.py", description=__doc__,
                   formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--toy", action="store_true", help="tiny config, CPU-friendly (a smoke run of this script)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--records", type=int, default=32)
    p.add_argument("--train-text-layers", type=int, default=8, help="decoder layers for the train-mode ratios")
    p.add_argument("--skip-full-depth", action="store_true", help="do not repeat delta and lora at full depth")
    p.add_argument("--json", default=None, help="results file (default: print only)")
    args = p.parse_args(argv)

    init_distributed()
    device = dist.device()
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    infer_cfg = resolve_ds_config("ds_configs/zero3_infer.json", micro_batch_size=args.batch_size,
                                  overrides=None if gpu else {"bf16.enabled": False})
    train_cfg = resolve_ds_config("ds_configs/zero3_bf16.json" if gpu else "ds_configs/zero3_fp32.json",
                                  micro_batch_size=args.batch_size)
    config, processor = base_config(args.toy)
    full_layers = config.text_config.num_hidden_layers
    train_layers = min(args.train_text_layers, full_layers) if not args.toy else max(1, full_layers // 2)
    records, source = sb.benchmark_records(args.records, seed=0, max_prompt_bytes=args.max_length // 2)
    meter = sb.PeakMemory(device)
    common = dict(batch_size=args.batch_size, max_length=args.max_length, warmup=args.warmup, steps=args.steps,
                  dtype=dtype)
    started = time.perf_counter()
    results = {"device": torch.cuda.get_device_name(device) if gpu else "cpu", "dtype": str(dtype),
               "toy": args.toy, "data": source, "full_text_layers": full_layers, "train_text_layers": train_layers,
               "train": {}, "full_depth": {}}

    def log(msg: str) -> None:
        if dist.is_rank0():
            print(f"[{time.perf_counter() - started:6.0f}s] {msg}", flush=True)

    # identify at full depth
    baseline = meter.current()
    loaded = build_model(config, processor, infer_cfg, dtype)

    results["total_params_full"] = count_parameters(loaded.model)
    engine = ShieldEngine(loaded, infer_cfg, **sb.engine_args("identify"))
    results["identify"] = sb.run_identify(engine, records, **common)
    results["identify"]["baseline_bytes"] = baseline
    log(f"identify: plain {results['identify']['plain']['median_s'] * 1e3:.1f} ms, "
        f"hooks {results['identify']['hooks']['median_s'] * 1e3:.1f} ms, every position's logits "
        f"{results['identify']['full_logits']['median_s'] * 1e3:.1f} ms")
    del loaded, engine
    sb.release()

    runs = [(mode, train_layers, results["train"]) for mode in sb.TRAIN_MODES]
    if not args.skip_full_depth and train_layers != full_layers:
        runs += [(mode, full_layers, results["full_depth"]) for mode in ("delta", "lora")]
    for mode, layers, into in runs:
        baseline = meter.current()
        loaded = build_model(with_text_layers(config, layers), processor, train_cfg, dtype)
        total = count_parameters(loaded.model)
        neuron_set = sb.benchmark_neuron_set(loaded.config, loaded.adapter, total)
        engine = ShieldEngine(loaded, train_cfg, **sb.engine_args(mode, neuron_set))
        result = sb.run_train(engine, mode, records, **common)
        result.update(baseline_bytes=baseline, total_params=total, text_layers=layers, neurons=neuron_set.count,
                      neuron_param_fraction=neuron_set.param_fraction)
        into[mode] = result
        log(f"{mode} @ {layers} layers: {result['median_s'] * 1e3:.1f} ms/step, {result['tokens_per_s']:.0f} tok/s, "
            f"peak {result['peak_bytes'] / 2**30:.2f} GiB, optimizer state {result['optimizer_state_bytes'] / 2**30:.3f} GiB")
        del loaded, neuron_set, engine
        sb.release()
    results["wall_s"] = time.perf_counter() - started
    results["ratios"] = sb.ratio_rows(results)
    if dist.is_rank0():
        train = results["train"]["mask"]
        print(f"\n## {'toy' if args.toy else 'LLaVA-1.5-7B-sized'} on {results['device']} ({dtype}), "
              f"identify at {full_layers} layers ({results['total_params_full']:,} parameters), train modes at "
              f"{train_layers} layers ({train['total_params']:,} parameters, {train['neurons']} neurons = "
              f"{train['neuron_param_fraction']:.4%}); wall {results['wall_s']:.0f}s\n")
        print(sb.format_ratio_table(results["ratios"]))
        print()
        print(sb.format_mode_table(results))
        if results["full_depth"]:
            print(f"\nfull depth ({full_layers} layers):\n")
            print(sb.format_mode_table({"train": results["full_depth"]}))
        if args.json:
            write_text(args.json, json.dumps(results, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
