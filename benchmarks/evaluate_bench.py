"""Evaluation (greedy generation) throughput: ZeRO-3 vs a replica per rank vs plain `transformers`.

Started by `benchmarks/run.py` (issue #14), three ways on the same checkpoint, prompts and batches:

    deepspeed --num_gpus 2 benchmarks/evaluate_bench.py --model DIR --engine zero-on  --out on.json
    deepspeed --num_gpus 2 benchmarks/evaluate_bench.py --model DIR --engine zero-off --out off.json
    python benchmarks/evaluate_bench.py --model DIR --engine plain --out plain.json

- zero-on / zero-off: what `recipes/evaluate.py --zero on|off` runs: `load_inference_model` (ZeRO-3
  engine from ds_configs/zero3_infer.json, or a plain replica on every rank) and `generate_responses`
  (prompts sharded over the ranks; synced_gpus under ZeRO-3; answers gathered on every rank);
- plain: one process, `AutoModelForImageTextToText.from_pretrained` and `model.generate` per batch
  (the same collated batches, greedy, KV cache), no DeepSpeed and no shield_ds generation code.

A timed pass generates for every record; --passes of them run after a one-batch warm-up. Tokens are
the answers' tokens (re-tokenized; the same in every engine, because the answers are compared and
must be identical). Rank 0 writes --out: pass times (max over ranks; median and min), tokens/s of the
median pass, peak memory over the passes, the answers.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import shield_bench as sb  # noqa: E402
from shield_ds import dist  # noqa: E402
from shield_ds.io import write_json  # noqa: E402

ENGINES = ("zero-on", "zero-off", "plain")
INFER_CONFIG = "ds_configs/zero3_infer.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint directory")
    p.add_argument("--engine", required=True, choices=ENGINES)
    p.add_argument("--records", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=8, help="records per generate call")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--max-prompt-bytes", type=int, default=64)
    p.add_argument("--passes", type=int, default=3, help="timed passes over all records")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the launcher
    p.add_argument("--out", required=True, type=Path)
    return p.parse_args(argv)


def count_tokens(tokenizer, answers: dict[str, str]) -> int:
    return sum(len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in answers.values())


@torch.no_grad()
def plain_generate(model, processor, adapter, records: list, *, batch_size: int, max_new_tokens: int) -> dict[str, str]:
    """{record id: answer} from `model.generate` batch by batch in this process (greedy, KV cache)."""
    from shield_ds.data import SafetyCollator, plan_batches

    collator = SafetyCollator(processor, adapter)
    tokenizer = getattr(processor, "tokenizer", processor)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    answers = {}
    for batch_records in plan_batches(list(records), batch_size):
        inputs = collator(batch_records).inputs
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                             pad_token_id=pad_id, use_cache=True)
        texts = tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        answers.update({r.id: t for r, t in zip(batch_records, texts)})
    return answers


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from shield_ds.engine import init_distributed, load_inference_model, resolve_ds_config
    from shield_ds.evaluate.generate import generate_responses
    from shield_ds.models import get_adapter

    if args.engine != "plain":
        init_distributed()
    meter = sb.PeakMemory(dist.device())
    baseline = meter.current()
    records, source = sb.benchmark_records(args.records, args.data_dir, args.seed, max_prompt_bytes=args.max_prompt_bytes)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    if args.engine == "plain":
        from transformers import AutoModelForImageTextToText, AutoProcessor

        model = AutoModelForImageTextToText.from_pretrained(args.model, dtype=torch.float32).eval()
        processor = AutoProcessor.from_pretrained(args.model)
        adapter = get_adapter(model.config)

        def generate(recs: list) -> dict[str, str]:
            return plain_generate(model, processor, adapter, recs, batch_size=args.batch_size,
                                  max_new_tokens=args.max_new_tokens)
    else:
        # The recipe's inference config in fp32 (as the identify benchmark and the equality tests).
        ds_config = resolve_ds_config(INFER_CONFIG, micro_batch_size=args.batch_size,
                                      overrides={"bf16.enabled": False})
        inference = load_inference_model(args.model, ds_config, args.engine.removeprefix("zero-"))
        processor, adapter = inference.loaded.processor, inference.loaded.adapter

        def generate(recs: list) -> dict[str, str]:
            return generate_responses(inference.model, processor, adapter, recs, batch_size=args.batch_size,
                                      max_new_tokens=args.max_new_tokens, dtype=inference.dtype,
                                      zero3=inference.zero3, device=inference.device, desc="bench")
    load_s = time.perf_counter() - start
    generate(records[: args.batch_size * dist.world_size()])  # warm-up: one batch per rank
    dist.barrier()
    memory_before = meter.current()
    meter.start()
    times = []
    for _ in range(args.passes):
        start = time.perf_counter()
        answers = generate(records)
        times.append(time.perf_counter() - start)
    times = sb.reduce_max(times)
    peak, before, base = sb.reduce_max([float(meter.peak()), float(memory_before), float(baseline)])
    tokenizer = getattr(processor, "tokenizer", processor)
    tokens = count_tokens(tokenizer, answers)
    summary = sb.summarise(times)
    result = {"engine": args.engine, "world_size": dist.world_size(), "records": len(records),
              "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens, "data": source,
              "pass_times_s": times, **summary, "pass_s": summary["median_s"], "tokens": tokens,
              "tokens_per_s": tokens / max(summary["median_s"], 1e-9),
              "tokens_per_s_best": tokens / max(summary["min_s"], 1e-9), "load_s": load_s,
              "peak_bytes": int(peak), "resident_before_bytes": int(before), "baseline_bytes": int(base),
              "memory_kind": meter.kind, "answers": answers}
    if args.engine != "plain":
        result["zero"] = inference.zero
    if dist.is_rank0():
        write_json(args.out, result)
        print({k: v for k, v in result.items() if k != "answers"}, flush=True)
    dist.barrier()


if __name__ == "__main__":
    main()
