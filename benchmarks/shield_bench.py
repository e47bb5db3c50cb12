"""Shared pieces of the shield-ds benchmarks (issue #7): benchmark models, the neuron set, the data,
one function per measured mode, memory and optimizer-state accounting, and the ratio table.

Used by `worker.py` (one mode per `deepspeed --num_gpus 2` launch, on CPU) and `gpu_7b.py`
(every mode in turn in one process on one GPU). Every mode is a `ShieldEngine` (the engine the
recipes use) and a train step is `ShieldEngine.train_step`, the step `ShieldTrainer` runs. Modes:

- identify: the same ZeRO-3 inference engine (mode infer) runs every batch three times, in rotating
  order: plain, with `ActivationStatistics` hooks attached (as `Identifier` does), and plain with the
  logits of every position (what identify asked for before `logits_to_keep=1`);
- ffn:   plain ZeRO-3 fine-tuning of the FFN matrices that hold selected neurons (engine mode full-ffn:
         the benchmark set has neurons in every layer; no masks);
- mask:  the same matrices trainable + `GradientMasker` (`--update mask`);
- delta: frozen base + slice parameters for the selected rows/columns + `GradientMasker` (`--update delta`);
- full:  plain ZeRO-3 fine-tuning of the whole model (engine mode full);
- lora:  PEFT LoRA r=8 on the same FFN matrices, frozen base (`--update lora --lora-rank 8
         --lora-targets gate,up,down`);
- mask-full-logits: mask mode with logits on every position (`train_step(logits_window=False)`), the
         baseline of the response window (`shield_ds.loss.response_window`).
"""

from __future__ import annotations

import gc
import math
import random
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch

from shield_ds import dist
from shield_ds.neurons.neuron_set import NeuronSet
from shield_ds.data import SafetyCollator, SafetyRecord, load_source, plan_batches, select_records, shard_batches
from shield_ds.data.targets import load_refusals, with_refusals
from shield_ds.errors import ShieldError
from shield_ds.models.tiny import BUILDERS
from shield_ds.neurons.statistics import ActivationStatistics
from shield_ds.plan import PlanSettings, ZeroSettings, count_model, inventory, plan_memory
from shield_ds.trainable import LoraSettings
from shield_ds.zero_internals import optimizer_state_tensors

log = dist.get_logger("bench")

TRAIN_MODES = ("ffn", "mask", "delta", "full", "lora", "mask-full-logits")
# Evaluation engines (evaluate_bench.py): ZeRO-3, a replica per rank, plain transformers in one process.
EVAL_ENGINES = ("zero-on", "zero-off", "plain")
# Budget of the benchmark neuron set: identify's default --max-param-fraction.
PARAM_FRACTION = 0.0003
LORA_RANK = 8

# Benchmark models beyond the tiny one: LLaVA (Llama text), random weights. large: ~183M parameters
# (~730 MB fp32); mid: ~50M (the scaling table's middle size).
LARGE_TEXT = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                  num_key_value_heads=16, vocab_size=32064, max_position_embeddings=2048)
LARGE_VISION = dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=8,
                    image_size=32, patch_size=8, projection_dim=512)
MID_TEXT = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
                num_key_value_heads=8, vocab_size=32064, max_position_embeddings=2048)
MID_VISION = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                  image_size=32, patch_size=8, projection_dim=256)
SHAPES = {"mid": (MID_TEXT, MID_VISION), "large": (LARGE_TEXT, LARGE_VISION)}

# Synthetic prompts for machines without the shared data (the GPU script); records are text-only.
SYNTHETIC_TOPICS = ["a lock", "a bridge", "a recipe", "a password", "a chemical", "a vaccine", "a car engine",
                    "a bank account", "a medicine", "a computer virus", "a garden", "a power grid"]


# --- models ----------------------------------------------------------------------------------
def build_llava(out_dir: str | Path, size: str, seed: int = 0) -> Path:
    """Save a random LLaVA checkpoint of shape `size` (a SHAPES key) that the normal `load_model` path reads.

    The processor (byte-level tokenizer, chat template, 32 px images) is the tiny llava one; the
    text model is Llama-shaped (large: hidden 1024, 8 layers, intermediate 2816, vocab 32064).
    """
    import transformers
    from transformers import AutoModelForImageTextToText


    text_shape, vision_shape = SHAPES[size]
    out_dir = Path(out_dir)
    tiny_config, processor = BUILDERS["llava"]("llava")
    tiny_text = tiny_config.text_config
    text = dict(text_shape, model_type="llama", bos_token_id=tiny_text.bos_token_id,
                eos_token_id=tiny_text.eos_token_id, pad_token_id=tiny_text.pad_token_id, tie_word_embeddings=False)
    vision = transformers.CLIPVisionConfig(**vision_shape, hidden_act="quick_gelu")
    config = transformers.LlavaConfig(text_config=text, vision_config=vision,
                                      image_token_index=tiny_config.image_token_index, image_seq_length=16,
                                      vision_feature_layer=-2, vision_feature_select_strategy="default",
                                      projector_hidden_act="gelu")
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


def benchmark_neuron_set(config, adapter, total_params: int, seed: int = 0,
                         fraction: float = PARAM_FRACTION) -> NeuronSet:
    """Random neurons with identify's default parameter budget, spread evenly over the layers.

    count = floor(fraction * total_params / params_per_neuron), at least one neuron per layer (a
    tiny model's budget would otherwise be empty); layer i gets count // L (+1 for the first
    count % L layers) neurons drawn without replacement from a generator seeded with `seed`.
    """
    layers, width = adapter.num_layers(config), adapter.intermediate_size(config)
    per_neuron = adapter.param_count_per_neuron(config)
    count = max(layers, math.floor(fraction * total_params / per_neuron))
    generator = torch.Generator().manual_seed(seed)
    selected = {}
    for layer in range(layers):
        k = min(width, count // layers + (1 if layer < count % layers else 0))
        selected[layer] = torch.randperm(width, generator=generator)[:k]
    chosen = sum(int(v.numel()) for v in selected.values())
    meta = {"num_layers": layers, "intermediate_size": width, "hidden_size": adapter.hidden_size(config),
            "total_params": total_params, "params_per_neuron": per_neuron,
            "param_fraction": chosen * per_neuron / total_params, "selection": f"random, seed {seed}",
            "budget_fraction": fraction}
    return NeuronSet(selected, meta)


# --- data ------------------------------------------------------------------------------------
def benchmark_records(count: int, data_dir: str | None = None, seed: int = 0,
                      max_prompt_bytes: int = 64) -> tuple[list, str]:
    """`count` text records (half harmful with refusal targets, half benign with a fixed answer).

    From the shared MultiJail/MultiQ files (English prompts of at most `max_prompt_bytes` UTF-8
    bytes, so that they fit the byte-level tokenizer's max_length) when present, else synthetic
    prompts. Returns (records, description of the source).
    """
    from dataclasses import replace


    half = max(1, count // 2)
    try:
        def short(spec: str, label: str) -> list:
            recs = select_records(load_source(spec, label=label, data_dir=data_dir), languages=["en"], seed=seed)
            return [r for r in recs if len(r.prompt.encode("utf-8")) <= max_prompt_bytes][:half]

        harmful, benign = short("multijail", "harmful"), short("multiq", "benign")
        source = "shared data: multijail (en, harmful) + multiq (en, benign)"
    except ShieldError:
        rng = random.Random(seed)
        topics = [rng.choice(SYNTHETIC_TOPICS) for _ in range(2 * half)]
        harmful = [SafetyRecord(id=f"h{i}", prompt=f"Explain step by step how to sabotage {t} so nobody notices.",
                                language="en", label="harmful") for i, t in enumerate(topics[:half])]
        benign = [SafetyRecord(id=f"b{i}", prompt=f"Explain step by step how {t} works, for a school report.",
                               language="en", label="benign") for i, t in enumerate(topics[half:])]
        source = "synthetic English prompts (shared data not found)"
    benign = [replace(r, response="Sure. Here is a short, factual answer to your question.") for r in benign]
    records = with_refusals(harmful, load_refusals()) + benign
    # Interleave so every batch mixes both labels.
    mixed = [r for pair in zip(records[:half], records[half:]) for r in pair]
    return mixed, source


def collate_batches(records: list, processor, adapter, batch_size: int, *, train: bool,
                    max_length: int | None, device, dtype: torch.dtype) -> list:
    """This rank's collated batches (every rank the same number), moved to `device`."""
    collator = SafetyCollator(processor, adapter, train=train, max_length=max_length)
    steps = shard_batches(plan_batches(records, batch_size), dist.rank(), dist.world_size())
    out = []
    for batch_records, weight in steps:
        batch = collator(batch_records, [weight] * len(batch_records))
        if not train and max_length is not None and batch.inputs["input_ids"].shape[1] > max_length:
            # Identify batches keep the prompt's last max_length tokens (left padding).
            batch.inputs = {k: v[:, -max_length:] if v.dim() >= 2 else v for k, v in batch.inputs.items()}
            batch.prompt_mask = batch.prompt_mask[:, -max_length:]
        out.append(batch.to(device, float_dtype=dtype))
    return out


# --- measurement helpers ---------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _proc_status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class PeakMemory:
    """Peak memory of a phase: CUDA max_memory_allocated on a GPU, else this process's peak anonymous RSS.

    CPU: Linux's VmHWM (the max RSS that resource.getrusage reports as ru_maxrss) is reset to the
    current RSS by writing 5 to /proc/self/clear_refs at `start()`, so the peak excludes loading.
    Both readings leave out file-backed pages (library code, mapped checkpoints): the kernel evicts
    those under memory pressure, which once made a small model's peak fall below its baseline.
    `peak()` is VmHWM less the file-backed pages resident when it is read.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda max_memory_allocated" if device.type == "cuda" else "peak anonymous RSS (VmHWM - RssFile)"

    def current(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.memory_allocated(self.device))
        return (_proc_status_kb("VmRSS") - _proc_status_kb("RssFile")) * 1024

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            log.warning("cannot reset the peak RSS (/proc/self/clear_refs); the peak includes loading")

    def peak(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        return (_proc_status_kb("VmHWM") - _proc_status_kb("RssFile")) * 1024


def reduce_max(values: list[float]) -> list[float]:
    """Element-wise max over ranks (float64)."""
    return dist.all_reduce(torch.tensor(values, dtype=torch.float64), op="max").tolist()


def reduce_sum(value: float) -> float:
    return float(dist.all_reduce(torch.tensor([value], dtype=torch.float64))[0])


def optimizer_state_bytes(ds_engine) -> int:
    """Bytes of the ZeRO-3 optimizer's fp32 partitions + the basic optimizer's state, summed over ranks."""
    local = sum(t.numel() * t.element_size() for t in optimizer_state_tensors(ds_engine))
    return int(reduce_sum(float(local)))


def summarise(times: list[float]) -> dict[str, float]:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)}


# --- modes -----------------------------------------------------------------------------------
# Benchmark mode -> the ShieldEngine mode it builds. "ffn" (the FFN matrices that hold selected neurons,
# stock nn.Linear, no mask) is the trainer's full-ffn: the benchmark neuron set has neurons in every layer.
ENGINE_MODES = {"ffn": "full-ffn", "mask": "mask", "delta": "delta", "full": "full", "lora": "lora",
                "mask-full-logits": "mask"}


def bench_lora() -> Any:
    """LoRA r=LORA_RANK on the FFN projections (the matrices mask mode trains), as `--update lora --lora-rank 8
    --lora-targets gate,up,down` would."""
    return LoraSettings(rank=LORA_RANK, targets=("gate", "up", "down"))


def engine_args(mode: str, neuron_set: NeuronSet | None = None) -> dict[str, Any]:
    """The ShieldEngine arguments of benchmark mode `mode` ("identify" or one of TRAIN_MODES)."""
    if mode == "identify":
        return {"mode": "infer"}
    if mode not in ENGINE_MODES:
        raise ValueError(f"unknown train mode {mode!r} (expected one of {', '.join(TRAIN_MODES)})")
    return {"mode": ENGINE_MODES[mode], "neuron_set": neuron_set, "lora": bench_lora() if mode == "lora" else None}


def model_params(config: Any) -> int:
    """Total parameters of a model config (counted on the meta device: no memory, no weights)."""
    return count_model(config).total_params


def run_train(engine: Any, mode: str, records: list, *, batch_size: int, max_length: int | None, warmup: int,
              steps: int, dtype: torch.dtype) -> dict[str, Any]:
    """Time `warmup + steps` optimizer steps of the trainer's own step, `ShieldEngine.train_step`
    (forward, response loss, backward, the gradient mask at the boundary, DeepSpeed's step).

    Returns per-step times (max over ranks), peak memory (max over ranks) and optimizer bytes.
    Destroys the engine afterwards.
    """
    meter = PeakMemory(dist.device())
    batches = collate_batches(records, engine.loaded.processor, engine.loaded.adapter, batch_size, train=True,
                              max_length=max_length, device=engine.device, dtype=dtype)
    engine.module.train()
    memory_before = meter.current()
    meter.start()
    times, tokens = [], []
    for i in range(warmup + steps):
        batch = batches[i % len(batches)]
        synchronize(engine.device)
        start = time.perf_counter()
        engine.train_step(batch, logits_window=mode != "mask-full-logits")
        synchronize(engine.device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
            tokens.append(int(batch.inputs["attention_mask"].sum()))
    peak = meter.peak()
    times = reduce_max(times)
    step_tokens = [reduce_sum(float(t)) for t in tokens]
    peak_max, before_max = reduce_max([float(peak), float(memory_before)])
    result = {"mode": mode, "trainable_params": engine.optimizer_params(), "steps": steps, "warmup": warmup,
              "step_times_s": times, **summarise(times),
              "tokens_per_s": sum(step_tokens) / max(sum(times), 1e-9),
              "peak_bytes": int(peak_max), "resident_before_steps_bytes": int(before_max),
              "memory_kind": meter.kind, "optimizer_state_bytes": optimizer_state_bytes(engine.ds)}
    engine.destroy()
    return result


# plain: identify's forward without hooks (logits_to_keep=1); hooks: identify's; full_logits: plain with the
# LM head on every position
IDENTIFY_VARIANTS = ("plain", "hooks", "full_logits")


@torch.no_grad()
def run_identify(engine: Any, records: list, *, batch_size: int, max_length: int | None,
                 warmup: int, steps: int, dtype: torch.dtype) -> dict[str, Any]:
    """Time plain ZeRO-3 forwards against forwards with ActivationStatistics hooks, and against plain
    forwards with the logits of every position, on one inference engine.

    Each batch runs in all three variants, the order rotating from step to step, so slow drift of a
    shared machine hits all alike. Destroys the engine afterwards.
    """
    model, adapter, config = engine.module, engine.loaded.adapter, engine.loaded.config
    batches = collate_batches(records, engine.loaded.processor, adapter, batch_size, train=False,
                              max_length=max_length, device=engine.device, dtype=dtype)
    groups = sorted({r.group for r in records})
    stats = ActivationStatistics(groups, adapter.num_layers(config), adapter.intermediate_size(config),
                                 device=engine.device)
    neuron_modules = [adapter.neuron_module(layer) for layer in adapter.decoder_layers(model)]
    meter = PeakMemory(dist.device())
    meter.start()

    def forward(batch, variant: str) -> float:
        hooked = variant == "hooks"
        if hooked:
            stats.attach(neuron_modules)
        synchronize(engine.device)
        start = time.perf_counter()
        if hooked:
            stats.set_batch(batch.prompt_mask, [r.group if w > 0 else None
                                                for r, w in zip(batch.records, batch.weights.tolist())])
        model(**batch.inputs, use_cache=False, logits_to_keep=0 if variant == "full_logits" else 1)
        if hooked:
            stats.clear_batch()
        synchronize(engine.device)
        elapsed = time.perf_counter() - start
        if hooked:
            stats.detach()
        return elapsed

    variants = IDENTIFY_VARIANTS  # rotated per step below
    times: dict[str, list[float]] = {v: [] for v in variants}
    tokens = []
    for i in range(warmup + steps):
        batch = batches[i % len(batches)]
        order = variants[i % len(variants):] + variants[:i % len(variants)]
        measured = {v: forward(batch, v) for v in order}
        if i >= warmup:
            for v in variants:
                times[v].append(measured[v])
            tokens.append(int(batch.inputs["attention_mask"].sum()))
    peak = meter.peak()
    engine.destroy()
    total_tokens = sum(reduce_sum(float(t)) for t in tokens)
    out: dict[str, Any] = {"steps": steps, "warmup": warmup, "peak_bytes": int(reduce_max([float(peak)])[0]),
                           "memory_kind": meter.kind}
    for v in variants:
        measured_times = reduce_max(times[v])
        out[v] = {"step_times_s": measured_times, **summarise(measured_times),
                  "tokens_per_s": total_tokens / sum(measured_times)}
    return out


def release() -> None:
    """Return freed memory after the caller dropped its references (between modes in one process)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    _malloc_trim()


def _malloc_trim() -> None:
    # glibc keeps freed heap pages resident: without handing them back, the next mode's baseline RSS
    # includes the previous mode's model, which the next mode then reuses without raising the RSS, and a
    # small model's peak minus baseline comes out negative (seen once in CI on the toy run).
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError, TypeError):  # not glibc: nothing to trim this way
        pass


# --- the ratio table ---------------------------------------------------------------------------
# (label, mode, baseline, metric, target or None)
RATIOS: list[tuple[str, str, str, str, float | None]] = [
    ("identify forward: hooks / plain", "identify.hooks", "identify.plain", "median_s", 1.05),
    ("identify forward: last-position logits / every position's", "identify.plain", "identify.full_logits",
     "median_s", None),
    ("train step time: mask / ffn", "mask", "ffn", "median_s", 1.05),
    ("train peak memory: mask / ffn", "mask", "ffn", "peak_net_bytes", 1.05),
    ("train step time: delta / full", "delta", "full", "median_s", 0.75),
    ("train peak memory: delta / full", "delta", "full", "peak_net_bytes", 0.75),
    ("train step time: lora / full", "lora", "full", "median_s", None),
    ("train peak memory: lora / full", "lora", "full", "peak_net_bytes", None),
    ("train step time: delta / lora", "delta", "lora", "median_s", 1.0),
    ("train peak memory: delta / lora", "delta", "lora", "peak_net_bytes", 1.0),
    ("optimizer state: delta / mask", "delta", "mask", "optimizer_state_bytes", 0.001),
    ("optimizer state: lora / mask", "lora", "mask", "optimizer_state_bytes", None),
    ("train step time: mask / mask with every position's logits", "mask", "mask-full-logits", "median_s", None),
    ("train peak memory: mask / mask with every position's logits", "mask", "mask-full-logits", "peak_net_bytes",
     None),
]


def _has(results: dict[str, Any], key: str) -> bool:
    if key.startswith("identify."):
        return key.split(".", 1)[1] in results.get("identify", {})  # older results have no full_logits
    return key in results.get("train", {})


def _metric(results: dict[str, Any], key: str, metric: str) -> float:
    if key.startswith("identify."):
        return float(results["identify"][key.split(".", 1)[1]][metric])
    entry = results["train"][key]
    if metric == "peak_net_bytes":
        return float(entry["peak_bytes"] - entry["baseline_bytes"])
    return float(entry[metric])


# (label, engine, baseline engine, target or None): tokens/s ratios, higher is better.
EVAL_RATIOS: list[tuple[str, str, str, float | None]] = [
    ("evaluate tokens/s: replica (--zero off) / ZeRO-3 (--zero on)", "zero-off", "zero-on", 5.0),
    ("evaluate tokens/s: replica (--zero off) / plain transformers, 1 process", "zero-off", "plain", None),
    ("evaluate tokens/s: ZeRO-3 (--zero on) / plain transformers, 1 process", "zero-on", "plain", None),
]


def evaluate_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Tokens/s ratios of the evaluation engines (target: at least)."""
    runs = (results.get("evaluate") or {}).get("engines")
    if not runs:
        return []
    rows = []
    for label, engine, base, target in EVAL_RATIOS:
        value, baseline = runs[engine]["tokens_per_s"], runs[base]["tokens_per_s"]
        ratio = value / baseline if baseline else float("nan")
        rows.append({"label": label, "metric": "tokens_per_s", "value": value, "baseline": baseline, "ratio": ratio,
                     "ratio_min": runs[engine]["tokens_per_s_best"] / runs[base]["tokens_per_s_best"],
                     "target": target, "at_least": True, "met": None if target is None else ratio >= target})
    return rows


def ratio_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per RATIOS entry whose modes were run: value, baseline value, ratio (median) and ratio of the minima;
    then the evaluation rows."""
    rows = []
    for label, mode, base, metric, target in RATIOS:
        if not (_has(results, mode) and _has(results, base)):
            continue
        value, baseline = _metric(results, mode, metric), _metric(results, base, metric)
        ratio = value / baseline if baseline else float("nan")
        row = {"label": label, "metric": metric, "value": value, "baseline": baseline, "ratio": ratio,
               "target": target, "met": None if target is None else ratio <= target}
        if metric == "median_s":
            row["ratio_min"] = _metric(results, mode, "min_s") / _metric(results, base, "min_s")
        rows.append(row)
    return rows + evaluate_rows(results)


def _fmt(metric: str, value: float) -> str:
    if metric == "tokens_per_s":
        return f"{value:.0f} tok/s"
    if metric.endswith("_s"):
        return f"{value * 1000:.1f} ms"
    if value >= 2**30:
        return f"{value / 2**30:.2f} GiB"
    if value >= 2**20:
        return f"{value / 2**20:.1f} MiB"
    return f"{value / 2**10:.1f} KiB"


def format_ratio_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| ratio | value | baseline | ratio (median) | ratio (min) | target | met |",
             "|---|---:|---:|---:|---:|---:|:---:|"]
    for r in rows:
        ratio_min = f"{r['ratio_min']:.3f}" if "ratio_min" in r else ""
        ratio = f"{r['ratio']:.4g}" if r["metric"] == "optimizer_state_bytes" else f"{r['ratio']:.3f}"
        target = "" if r["target"] is None else f"{'>=' if r.get('at_least') else '<='} {r['target']:g}"
        met = "" if r["met"] is None else ("yes" if r["met"] else "**no**")
        lines.append(f"| {r['label']} | {_fmt(r['metric'], r['value'])} | {_fmt(r['metric'], r['baseline'])} | "
                     f"{ratio} | {ratio_min} | {target} | {met} |")
    return "\n".join(lines)


def format_mode_table(results: dict[str, Any]) -> str:
    """Absolute numbers per mode (for RESULTS.md)."""
    lines = ["| mode | trainable params | step median | step min | tokens/s | peak mem | peak - baseline | optimizer state |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    ident = results.get("identify")
    if ident:
        for name in (v for v in IDENTIFY_VARIANTS if v in ident):
            e = ident[name]
            lines.append(f"| identify {name} | - | {_fmt('s_s', e['median_s'])} | {_fmt('s_s', e['min_s'])} | "
                         f"{e['tokens_per_s']:.0f} | | | |")
    for mode, e in results.get("train", {}).items():
        lines.append(f"| {mode} | {e['trainable_params']:,} | {_fmt('s_s', e['median_s'])} | {_fmt('s_s', e['min_s'])} | "
                     f"{e['tokens_per_s']:.0f} | {_fmt('b', e['peak_bytes'])} | "
                     f"{_fmt('b', e['peak_bytes'] - e['baseline_bytes'])} | {_fmt('b', e['optimizer_state_bytes'])} |")
    if len(lines) == 2:  # neither identify nor train ran
        lines = []
    evaluate = results.get("evaluate")
    if evaluate:
        lines += ["", "| evaluate engine | ranks | pass median | pass min | tokens/s | weights per rank |",
                  "|---|---:|---:|---:|---:|---:|"]
        for engine in EVAL_ENGINES:
            e = evaluate["engines"][engine]
            lines.append(f"| {engine} | {e['ranks']} | {_fmt('s_s', e['median_s'])} | {_fmt('s_s', e['min_s'])} | "
                         f"{e['tokens_per_s']:.0f} | {_fmt('b', e['weight_bytes_per_rank'])} |")
        lines.append(f"\nevaluate: {evaluate['records']} records x up to {evaluate['max_new_tokens']} new tokens "
                     f"({evaluate['engines']['plain']['tokens']} answer tokens), batch {evaluate['batch_size']}, "
                     f"{evaluate['passes']} passes per engine in rotating order; answers identical in all three "
                     f"engines: {'yes' if evaluate['identical'] else '**no**'}")
    return "\n".join(lines)


# --- the scaling table (issue #14) ---------------------------------------------------------------
# The planner's model states: weights, gradients, fp32 master + Adam moments and the fp32 step buffer.
PLAN_MODEL_STATE = ("weights", "gradients", "optimizer", "fp32 step gradient buffer")


def planned_model_state(model_dir: str | Path, ds_config: dict, ranks: int, mode: str,
                        neuron_fraction: float | None) -> float | None:
    """Model-state bytes per rank that `shield_ds.plan.plan_memory` predicts for `mode` on `ranks` ranks
    of one node with the run's ds_config (fp32, its bucket sizes and persistence threshold).

    identify: the weights alone (inference holds no gradients or optimizer state); mask, delta and
    lora (with bench_lora's rank and targets): PLAN_MODEL_STATE; None for a mode the planner does not model."""
    if mode not in ("identify", "mask", "delta", "lora"):
        return None
    zero_cfg = ds_config.get("zero_optimization", {})
    defaults = ZeroSettings()
    zero = ZeroSettings(
        reduce_bucket_size=int(zero_cfg.get("reduce_bucket_size", defaults.reduce_bucket_size)),
        prefetch_bucket_size=int(zero_cfg.get("stage3_prefetch_bucket_size", defaults.prefetch_bucket_size)),
        param_persistence_threshold=int(zero_cfg.get("stage3_param_persistence_threshold",
                                                     defaults.param_persistence_threshold)),
        sub_group_size=int(zero_cfg.get("sub_group_size", defaults.sub_group_size)))
    dtype = "bf16" if ds_config.get("bf16", {}).get("enabled") else "fp32"
    lora = bench_lora()
    settings = PlanSettings(nodes=1, gpus_per_node=ranks, update=mode if mode in ("delta", "lora") else "mask",
                            dtype=dtype, neuron_fraction=neuron_fraction or PARAM_FRACTION, lora_rank=lora.rank,
                            lora_targets=lora.targets, zero=zero)
    plan = plan_memory(inventory(str(model_dir)), settings)
    items = ("weights",) if mode == "identify" else PLAN_MODEL_STATE
    return float(sum(plan.gpu.get(item, 0.0) for item in items))


def scaling_row(size: str, ranks: int, mode: str, result: dict[str, Any], model_dir: str | Path) -> dict[str, Any]:
    """One row of the scaling table from a worker's result (identify: the hooked forward, which identify runs)."""
    timing = result["hooks"] if mode == "identify" else result
    return {"size": size, "ranks": ranks, "mode": mode, "total_params": result["total_params"],
            "trainable_params": result.get("trainable_params", 0), "median_s": timing["median_s"],
            "tokens_per_s": timing["tokens_per_s"], "peak_bytes": result["peak_bytes"],
            "baseline_bytes": result["baseline_bytes"], "memory_kind": result["memory_kind"],
            "planned_model_state_bytes": planned_model_state(model_dir, result["ds_config"], ranks, mode,
                                                             result.get("neuron_param_fraction"))}


def format_scaling_table(rows: list[dict[str, Any]]) -> str:
    """The scaling table: per size, ranks and mode the step time, tokens/s, peak memory per rank (and the
    peak above the process before the model was loaded) and the planner's model-state prediction."""
    lines = ["| size | parameters | ranks | mode | trainable | step median | tokens/s | peak mem per rank | "
             "peak - process baseline | planner: model state per rank |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        planned = r["planned_model_state_bytes"]
        lines.append(f"| {r['size']} | {r['total_params']:,} | {r['ranks']} | {r['mode']} | "
                     f"{r['trainable_params']:,} | {_fmt('s_s', r['median_s'])} | {r['tokens_per_s']:.0f} | "
                     f"{_fmt('b', r['peak_bytes'])} | {_fmt('b', r['peak_bytes'] - r['baseline_bytes'])} | "
                     f"{'n/a' if planned is None else _fmt('b', planned)} |")
    return "\n".join(lines)


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start
