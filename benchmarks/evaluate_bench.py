"""Evaluation (greedy generation) throughput: ZeRO-3 vs a replica per rank vs plain `transformers`.

Started by `benchmarks/run.py` (issue #14) through the launcher; one process group runs all three
engines on the same checkpoint, prompts and batches, in alternating order from pass to pass, so
that the drift of a shared machine hits them alike:

    deepspeed --num_gpus 2 benchmarks/evaluate_bench.py --model DIR --out evaluate.json

- zero-on / zero-off: what `recipes/evaluate.py --zero on|off` runs: `ShieldEngine.load` (mode infer) (ZeRO-3
  engine from ds_configs/zero3_infer.json, or a plain replica on every rank) and `generate_responses`
  (prompts sharded over the ranks; synced_gpus under ZeRO-3; answers gathered on every rank);
- plain: `model.generate` of a `from_pretrained` model per batch on rank 0 alone (the other ranks
  wait at a barrier): plain `transformers` in one process, no DeepSpeed and no shield_ds generation.

The replica is loaded first, then the ZeRO-3 model (partitioned under zero.Init); plain uses the
replica's module, which is the model `from_pretrained` returned. Each engine generates one batch per
rank to warm up, then --passes timed passes over all records. Tokens are the answers' new tokens up
to and including the first end-of-sequence token, counted from the ids `generate` returned
(`TokenCounter`); they are the same in every engine because the answers are compared and must be
identical: the texts and the token ids (the random large model's ids mostly lie outside the small
tokenizer's vocabulary and decode to nothing). Rank 0 writes --out: per engine the pass times (max
over ranks; median and min), tokens/s of the median and of the fastest pass, the weight bytes each
rank holds, and whether the answers of all engines are identical.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import shield_bench as sb  # noqa: E402
from shield_ds import dist  # noqa: E402
from shield_ds.process_group import ToolParser, exit_on_error, init_distributed  # noqa: E402
from shield_ds.io import write_json  # noqa: E402
from shield_ds.data import SafetyCollator, plan_batches  # noqa: E402
from shield_ds.engine import ShieldEngine, resolve_ds_config  # noqa: E402
from shield_ds.evaluate.generate import generate_responses  # noqa: E402
from shield_ds.zero_internals import held_numel  # noqa: E402

INFER_CONFIG = "ds_configs/zero3_infer.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ToolParser(prog="python benchmarks/evaluate_bench.py", description=__doc__,
                   formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint directory")
    p.add_argument("--records", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=8, help="records per generate call")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--max-prompt-bytes", type=int, default=64)
    p.add_argument("--passes", type=int, default=3, help="timed passes over all records, per engine")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the launcher
    p.add_argument("--out", required=True, type=Path)
    return p.parse_args(argv)


class TokenCounter:
    """Wraps `model.generate` and keeps each generated row's new token ids, cut after the first stop token."""

    def __init__(self, model: torch.nn.Module, stop_ids: set[int]):
        self.rows: list[tuple[int, ...]] = []
        self.stop_ids = stop_ids
        self._generate = model.generate
        model.generate = self

    def __call__(self, **kwargs):
        out = self._generate(**kwargs)
        for row in out[:, kwargs["input_ids"].shape[1]:].tolist():
            end = next((i + 1 for i, token in enumerate(row) if token in self.stop_ids), len(row))
            self.rows.append(tuple(row[:end]))
        return out


def stop_ids(model: torch.nn.Module, tokenizer) -> set[int]:
    eos = model.generation_config.eos_token_id
    return {*(eos if isinstance(eos, (list, tuple)) else [eos]), tokenizer.eos_token_id} - {None}


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameters this rank holds: ZeRO-3 partitions (plus persistent parameters), else everything."""
    return sum(held_numel(p) * p.element_size() for p in model.parameters())


@torch.no_grad()
def plain_generate(model, processor, adapter, records: list, *, batch_size: int, max_new_tokens: int) -> dict[str, str]:
    """{record id: answer} from `model.generate` batch by batch in this process (greedy, KV cache)."""
    collator = SafetyCollator(processor, adapter)
    tokenizer = getattr(processor, "tokenizer", processor)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    answers = {}
    for batch_records in plan_batches(list(records), batch_size):
        inputs = collator(batch_records).inputs
        # synced_gpus off explicitly: transformers turns it on while a ZeRO-3 HfDeepSpeedConfig is alive
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                             pad_token_id=pad_id, use_cache=True, synced_gpus=False)
        texts = tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        answers.update({r.id: t for r, t in zip(batch_records, texts)})
    return answers


@exit_on_error
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)

    init_distributed()
    records, source = sb.benchmark_records(args.records, args.data_dir, args.seed, max_prompt_bytes=args.max_prompt_bytes)
    # The recipe's inference config in fp32 (as the identify benchmark and the equality tests).
    ds_config = resolve_ds_config(INFER_CONFIG, micro_batch_size=args.batch_size, overrides={"bf16.enabled": False})
    replica = ShieldEngine.load(args.model, ds_config, zero="off")  # first: built outside zero.Init
    zero3 = ShieldEngine.load(args.model, ds_config, zero="on")
    processor, adapter = replica.loaded.processor, replica.loaded.adapter
    tokenizer = getattr(processor, "tokenizer", processor)
    counters = {name: TokenCounter(m.module, stop_ids(m.module, tokenizer)) for name, m in
                (("zero-on", zero3), ("zero-off", replica))}
    counters["plain"] = counters["zero-off"]  # the same module

    def shield(inference) -> Callable[[list], dict[str, str]]:
        return lambda recs: generate_responses(inference.module, processor, adapter, recs, batch_size=args.batch_size,
                                               max_new_tokens=args.max_new_tokens, dtype=inference.dtype,
                                               zero3=inference.zero3, device=inference.device, desc="bench")

    def plain(recs: list) -> dict[str, str]:
        if not dist.is_rank0():
            return {}
        return plain_generate(replica.module, processor, adapter, recs, batch_size=args.batch_size,
                              max_new_tokens=args.max_new_tokens)

    engines = {"zero-on": shield(zero3), "zero-off": shield(replica), "plain": plain}
    names = list(sb.EVAL_ENGINES)
    for name in names:  # warm-up: one batch per rank
        engines[name](records[: args.batch_size * dist.world_size()])
        dist.barrier()
    times: dict[str, list[float]] = {name: [] for name in names}
    answers: dict[str, dict[str, str]] = {}
    token_rows: dict[str, list] = {}
    for index in range(args.passes):
        for name in names[index % len(names):] + names[: index % len(names)]:  # rotate the order per pass
            counters[name].rows.clear()
            dist.barrier()
            start = time.perf_counter()
            answers[name] = engines[name](records)
            times[name].append(time.perf_counter() - start)
            dist.barrier()
            token_rows[name] = sorted(row for rows in dist.all_gather_object(counters[name].rows) for row in rows)
    answers["plain"] = dist.broadcast_object(answers["plain"])
    sizes = {"zero-on": weight_bytes(zero3.module), "zero-off": weight_bytes(replica.module),
             "plain": weight_bytes(replica.module)}
    result = {"records": len(records), "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
              "passes": args.passes, "data": source, "world_size": dist.world_size(), "engines": {}}
    for name in names:
        pass_times = sb.reduce_max(times[name])
        tokens = sum(len(row) for row in token_rows[name])
        result["engines"][name] = {
            "ranks": 1 if name == "plain" else dist.world_size(), "pass_times_s": pass_times,
            **sb.summarise(pass_times), "tokens": tokens,
            "tokens_per_s": tokens / max(statistics.median(pass_times), 1e-9),
            "tokens_per_s_best": tokens / max(min(pass_times), 1e-9),
            "weight_bytes_per_rank": int(sb.reduce_max([float(sizes[name])])[0])}
    result["engines"]["zero-on"]["zero"], result["engines"]["zero-off"]["zero"] = zero3.zero, replica.zero
    result["identical"] = all(answers[n] == answers[names[0]] and token_rows[n] == token_rows[names[0]]
                              for n in names[1:])
    if dist.is_rank0():
        write_json(args.out, result)
        print({n: {k: v for k, v in e.items() if k != "pass_times_s"} for n, e in result["engines"].items()},
              flush=True)
    dist.barrier()


if __name__ == "__main__":
    main()
