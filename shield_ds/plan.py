"""Memory planner: will a Precise Shield run fit under ZeRO-3 on N nodes x G GPUs?

    python -m shield_ds.plan --model llava-1.5-7b --nodes 1 --gpus-per-node 8 --update delta
    python -m shield_ds.plan --table          # the README table for the three presets

What is counted (all sizes in GiB = 2**30 bytes; W = nodes x gpus_per_node ranks):

* weights: every parameter in the training dtype (2 bytes for bf16), ZeRO-3 partitioned over W
  ranks. Parameters with <= stage3_param_persistence_threshold elements (norms, biases) are
  persistent, i.e. replicated whole on every rank. Delta mode adds the delta parameters.
* gradients: ZeRO-3 keeps a partitioned gradient only for trainable parameters, in the gradient
  accumulation dtype (DeepSpeed default: the model dtype, 2 bytes for bf16).
* optimizer: fp32 master copy + Adam exp_avg + exp_avg_sq = 12 bytes per trainable parameter,
  partitioned. With the bf16 weight and bf16 gradient that is 16 bytes per trainable parameter.
  On top, DeepSpeed allocates one fp32 gradient buffer of the largest optimizer sub-group
  (min(sub_group_size, local partition) x 4 bytes) that the step reads from.
* ZeRO-3 buffers: the gathered (all-gathered, unpartitioned) working set = the largest module's
  weights, plus its full gradient when that module is trainable, plus the prefetch bucket; and the
  reduce (ipg) bucket of reduce_bucket_size elements. DeepSpeed defaults are used.
* activations, with activation checkpointing on every decoder layer (the recipe's setting): one
  saved layer input (B x S x hidden) per layer, plus the recomputed working set of one layer during
  backward (its saved tensors and as much again for their gradients), plus the logits of the loss
  (bf16 logits, fp32 upcast, fp32 log-softmax, fp32 gradient = 14 bytes per logit). S counts every
  token the language model sees, image tokens included. The frozen vision tower has nothing
  trainable upstream, so autograd saves nothing for it; its transient forward memory is ignored.
* runtime reserve: 2 GiB per GPU for the CUDA context, NCCL and cuBLAS workspaces.
* host, per node: 4 GiB per rank for the process (Python, torch, CUDA host libraries, data
  loading), plus what is offloaded. --offload is DeepSpeed's offload_optimizer=cpu: fp32 master,
  Adam moments, gradient partitions and the fp32 sub-group gradient buffers move to host;
  --offload-params additionally moves the partitioned bf16 weights there.

The two update modes differ only in what is trainable:

* mask: the trainable tensors are the WHOLE gate/up/down matrices of every language-model layer
  that holds a selected neuron (with ~0.03% of neurons spread over all layers, that is practically
  all FFN matrices), and a gradient mask zeroes everything but the selected rows/columns before the
  step. ZeRO-3 still keeps the 16-bytes-per-parameter state for all of them, sharded.
* delta: the base model is frozen; trainable = neuron_fraction x total parameters, rounded to whole
  neurons (one gate row + one up row + one down column = 3 x hidden parameters each). Optimizer
  state shrinks by the same factor; weights and activations are the same as in mask mode because
  gradients still flow back through every layer.
* lora (the baseline arm): the base model is frozen; trainable = rank x (in + out features) of every
  targeted language-model decoder-layer projection (`--lora-rank`, `--lora-targets`, the train
  recipe's flags), and the adapters add as many weights.

DeepSpeed's own estimator (estimate_zero3_model_states_mem_needs) assumes every parameter is
trainable (18 bytes/param on GPU without offload, plus 4 x the largest layer); it is printed as a
full-fine-tuning reference and, applied to the trainable subset alone, next to the itemised count.
"""

from __future__ import annotations

import argparse
import functools
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from shield_ds.config import LORA_TARGETS
from shield_ds.errors import ShieldError, first_line
from shield_ds.process_group import ToolParser, exit_on_error
from shield_ds.plan_presets import PRESETS

GIB = 2**30
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
FFN_WEIGHT = re.compile(r"\.mlp\.(gate_proj|up_proj|down_proj)\.weight$")
VISION_PART = re.compile(r"vision|visual")

DEFAULT_GPU_MEMORY_GIB = 80.0
# A common 8-GPU training node has 1-2 TiB of RAM; assume the smaller one.
DEFAULT_HOST_MEMORY_GIB = 1024.0
DEFAULT_MICRO_BATCH = 1
DEFAULT_SEQ_LEN = 2048
DEFAULT_NEURON_FRACTION = 0.0003
DEFAULT_LORA_RANK = 8
DECODER_LINEAR = re.compile(r"\.layers\.\d+\.(?:self_attn|mlp)\.(\w+_proj)$")
RUNTIME_RESERVE_GIB = 2.0
HOST_PER_RANK_GIB = 4.0
LOGIT_BYTES = 14  # bf16 logits 2 + fp32 upcast 4 + fp32 log-softmax 4 + fp32 gradient 4
ADAM_STATE_BYTES = 12  # fp32 master 4 + exp_avg 4 + exp_avg_sq 4
FP32 = 4


@dataclass(frozen=True)
class ZeroSettings:
    """The ZeRO-3 knobs that size buffers (DeepSpeed 0.19 defaults)."""

    reduce_bucket_size: int = 500_000_000
    prefetch_bucket_size: int = 50_000_000
    param_persistence_threshold: int = 100_000
    sub_group_size: int = 1_000_000_000


@dataclass(frozen=True)
class ModelInventory:
    """Parameter counts and text-model shapes, read from a meta-device instantiation."""

    name: str
    total_params: int
    ffn_params: int  # language-model gate/up/down matrices
    ffn_layers: int  # decoder layers that have an FFN
    largest_module_params: int  # DeepSpeed's "largest layer": most direct parameters of one module
    largest_ffn_matrix: int
    param_numels: tuple[int, ...]  # every (deduplicated) parameter, for the persistence threshold
    hidden: int
    intermediate: int
    num_layers: int
    kv_dim: int
    vocab: int
    # in + out features summed over the language model's decoder layers, per projection leaf
    # ("q_proj", ..., "down_proj"): LoRA of rank r on a projection trains r x this many parameters
    projection_widths: tuple[tuple[str, int], ...] = ()

    def persistent_params(self, threshold: int) -> int:
        """Elements in parameters small enough for ZeRO-3 to keep unpartitioned on every rank."""
        return sum(n for n in self.param_numels if n <= threshold)


@dataclass(frozen=True)
class PlanSettings:
    """Cluster shape, update mode and workload of one plan."""

    nodes: int = 1
    gpus_per_node: int = 8
    update: str = "mask"  # "mask", "delta" or "lora"
    offload: bool = False  # offload_optimizer=cpu
    offload_params: bool = False  # offload_param=cpu as well
    gpu_memory_gib: float = DEFAULT_GPU_MEMORY_GIB
    host_memory_gib: float = DEFAULT_HOST_MEMORY_GIB
    micro_batch: int = DEFAULT_MICRO_BATCH
    seq_len: int = DEFAULT_SEQ_LEN
    neuron_fraction: float = DEFAULT_NEURON_FRACTION
    lora_rank: int = DEFAULT_LORA_RANK
    lora_targets: tuple[str, ...] = LORA_TARGETS
    dtype: str = "bf16"
    zero: ZeroSettings = field(default_factory=ZeroSettings)

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass
class MemoryPlan:
    """Per-GPU and per-node host bytes, item by item, and the verdict."""

    model: ModelInventory
    settings: PlanSettings
    trainable_params: int
    neurons: int
    gpu: dict[str, float]  # bytes per GPU
    host: dict[str, float]  # bytes per node
    deepspeed_full: tuple[int, int]  # (host bytes per node, GPU bytes) for full fine-tuning
    deepspeed_trainable: tuple[int, int]  # the same estimator on the trainable subset alone

    @property
    def gpu_total(self) -> float:
        return sum(self.gpu.values())

    @property
    def host_total(self) -> float:
        return sum(self.host.values())

    @property
    def gpu_headroom_gib(self) -> float:
        return self.settings.gpu_memory_gib - self.gpu_total / GIB

    @property
    def host_headroom_gib(self) -> float:
        return self.settings.host_memory_gib - self.host_total / GIB

    @property
    def fits(self) -> bool:
        return self.gpu_headroom_gib >= 0 and self.host_headroom_gib >= 0

    @property
    def optimizer_bytes(self) -> float:
        """Optimizer state (fp32 master + Adam moments) per GPU, wherever it lives (for callers of the
        Python API; tests/test_plan.py compares the update modes with it)."""
        return ADAM_STATE_BYTES * self.trainable_params / self.settings.world_size

    def verdict(self) -> str:
        """The one-line verdict: `fits` / `does not fit` and by how much."""
        s = self.settings
        gpu = f"{abs(self.gpu_headroom_gib):.1f} GiB per GPU ({self.gpu_total / GIB:.1f} of {s.gpu_memory_gib:g})"
        host = (f"{abs(self.host_headroom_gib):.1f} GiB host per node "
                f"({self.host_total / GIB:.1f} of {s.host_memory_gib:g})")
        if self.fits:
            return f"fits: headroom {gpu}, {host}"
        short = []
        if self.gpu_headroom_gib < 0:
            short.append(gpu)
        if self.host_headroom_gib < 0:
            short.append(host)
        return "does not fit: short by " + " and ".join(short)


# ---------------------------------------------------------------- model resolution and counting

def _looks_like_path(model: str) -> bool:
    return model.endswith(".json") or model.startswith((".", "/", "~")) or Path(model).exists()


def resolve_config(model: str):
    """A transformers config from a preset name, a config.json / checkpoint dir, or a hub name."""
    from transformers import AutoConfig

    if model in PRESETS:
        return PRESETS[model]()
    if _looks_like_path(model):
        path = Path(model).expanduser()
        config_file = path / "config.json" if path.is_dir() else path
        if not config_file.is_file():
            raise ShieldError(f"model config not found: {config_file}")
        try:
            return AutoConfig.from_pretrained(str(config_file))
        except Exception as exc:  # transformers raises several types for a bad file
            raise ShieldError(f"cannot read model config {config_file}: {first_line(exc)}") from exc
    try:
        return AutoConfig.from_pretrained(model)
    except Exception as exc:
        raise ShieldError(f"cannot load config for model {model!r} (not a preset "
                          f"{sorted(PRESETS)}, not a local path, hub unreachable or unknown): "
                          f"{first_line(exc)}") from exc


def count_model(config, name: str = "") -> ModelInventory:
    """Instantiate `config` on the meta device and count parameters (no memory, no weights)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    model = None
    errors = []
    for auto in (AutoModelForImageTextToText, AutoModelForCausalLM):
        try:
            with torch.device("meta"):
                model = auto.from_config(config)
            break
        except (ValueError, KeyError) as exc:  # not a model type this auto class maps
            errors.append(first_line(exc))
    if model is None:
        raise ShieldError(f"model {name or config.model_type!r}: no image-text-to-text or causal-LM class "
                          f"for model_type {config.model_type!r} ({errors[-1]})")

    numels = []
    ffn_params = ffn_matrices = largest_ffn = 0
    for param_name, param in model.named_parameters():  # shared (tied) parameters appear once
        numels.append(param.numel())
        if FFN_WEIGHT.search(param_name) and not VISION_PART.search(param_name):
            ffn_params += param.numel()
            ffn_matrices += 1
            largest_ffn = max(largest_ffn, param.numel())
    largest_module = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    widths: dict[str, int] = {}
    for module_name, module in model.named_modules():
        found = DECODER_LINEAR.search(module_name)
        if found and isinstance(module, torch.nn.Linear) and not VISION_PART.search(module_name):
            widths[found.group(1)] = widths.get(found.group(1), 0) + module.in_features + module.out_features
    if ffn_params == 0:
        raise ShieldError(f"model {name or config.model_type!r}: no language-model gate_proj/up_proj/down_proj "
                          "matrices found (not a gated-FFN model)")

    text = config.get_text_config()
    hidden = text.hidden_size
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    return ModelInventory(
        name=name or config.model_type, total_params=sum(numels), ffn_params=ffn_params,
        ffn_layers=ffn_matrices // 3, largest_module_params=largest_module, largest_ffn_matrix=largest_ffn,
        param_numels=tuple(numels), hidden=hidden, intermediate=text.intermediate_size,
        num_layers=text.num_hidden_layers, kv_dim=kv_heads * head_dim, vocab=text.vocab_size,
        projection_widths=tuple(sorted(widths.items())))


@functools.lru_cache(maxsize=None)
def inventory(model: str) -> ModelInventory:
    """Resolve and count `model` (cached: presets are counted once per process)."""
    return count_model(resolve_config(model), name=model)


# ---------------------------------------------------------------- the arithmetic

UPDATES = ("mask", "delta", "lora")


def lora_widths(model: ModelInventory, targets: tuple[str, ...]) -> dict[str, int]:
    """{projection: in + out features over all decoder layers} for LoRA `targets` (q or q_proj, ...)."""
    have = dict(model.projection_widths)
    widths = {}
    for target in targets:
        leaf = target if target.endswith("_proj") else f"{target}_proj"
        if leaf not in have:
            raise ShieldError(f"LoRA target {target!r}: model {model.name!r} has no decoder-layer {leaf} "
                              f"(has {', '.join(sorted(have)) or 'none'})")
        widths[leaf] = have[leaf]
    return widths


def plan_memory(model: ModelInventory, settings: PlanSettings) -> MemoryPlan:
    """Itemised per-GPU and per-node host memory for one configuration."""
    s, z = settings, settings.zero
    if s.update not in UPDATES:
        raise ShieldError(f"--update must be one of {', '.join(UPDATES)}, got {s.update!r}")
    if s.dtype not in DTYPE_BYTES:
        raise ShieldError(f"--dtype must be one of {sorted(DTYPE_BYTES)}, got {s.dtype!r}")
    if min(s.nodes, s.gpus_per_node, s.micro_batch, s.seq_len) < 1:
        raise ShieldError("--nodes, --gpus-per-node, --micro-batch and --seq-len must be >= 1")
    if s.lora_rank < 1:
        raise ShieldError(f"--lora-rank must be >= 1, got {s.lora_rank}")
    if not 0 < s.neuron_fraction < 1:
        raise ShieldError(f"--neuron-fraction must be in (0, 1), got {s.neuron_fraction}")
    world, wb, h = s.world_size, DTYPE_BYTES[s.dtype], model.hidden

    neuron_params = 3 * h
    if s.update == "mask":
        trainable = model.ffn_params
        neurons = round(s.neuron_fraction * model.total_params / neuron_params)
        largest_trainable = model.largest_ffn_matrix
        extra_weights = 0
    elif s.update == "lora":
        neurons = 0
        widths = lora_widths(model, s.lora_targets)
        trainable = s.lora_rank * sum(widths.values())
        # one target's adapters of one layer (A and B), with the widths spread evenly over the layers
        largest_trainable = s.lora_rank * math.ceil(max(widths.values()) / model.num_layers)
        extra_weights = trainable
    else:
        neurons = max(1, round(s.neuron_fraction * model.total_params / neuron_params))
        trainable = neurons * neuron_params
        # Delta tensors per layer, with the neurons spread evenly over the FFN layers.
        largest_trainable = math.ceil(neurons / model.ffn_layers) * h
        extra_weights = trainable

    persistent = model.persistent_params(z.param_persistence_threshold)
    partitioned = model.total_params + extra_weights - persistent
    local_trainable = trainable / world
    step_grad_buffer = FP32 * min(z.sub_group_size, math.ceil(local_trainable))

    gpu: dict[str, float] = {}
    host: dict[str, float] = {"process (per rank)": HOST_PER_RANK_GIB * GIB * s.gpus_per_node}
    weights = wb * partitioned / world
    if s.offload_params:
        host["weights (offloaded)"] = weights * s.gpus_per_node
        gpu["weights (persistent only)"] = wb * persistent
    else:
        gpu["weights"] = weights + wb * persistent
    grads = wb * local_trainable
    optimizer = ADAM_STATE_BYTES * local_trainable
    if s.offload:
        host["gradients (offloaded)"] = grads * s.gpus_per_node
        host["optimizer (offloaded)"] = optimizer * s.gpus_per_node
        # one pinned fp32 gradient buffer per sub-group, plus DeepSpeed's shared step buffer
        host["fp32 step gradients (offloaded)"] = (FP32 * local_trainable + step_grad_buffer) * s.gpus_per_node
    else:
        gpu["gradients"] = grads
        gpu["optimizer"] = optimizer
        gpu["fp32 step gradient buffer"] = step_grad_buffer
    gpu["zero-3 gathered params"] = (max(wb * model.largest_module_params, 2 * wb * largest_trainable)
                                     + wb * z.prefetch_bucket_size)
    gpu["zero-3 reduce bucket"] = wb * z.reduce_bucket_size
    gpu["activations"] = activation_bytes(model, s.micro_batch, s.seq_len, wb)
    gpu["runtime reserve"] = RUNTIME_RESERVE_GIB * GIB

    return MemoryPlan(model=model, settings=s, trainable_params=trainable, neurons=neurons, gpu=gpu, host=host,
                      deepspeed_full=_deepspeed_estimate(model.total_params, model.largest_module_params, s),
                      deepspeed_trainable=_deepspeed_estimate(trainable, largest_trainable, s))


def activation_bytes(model: ModelInventory, micro_batch: int, seq_len: int, act_bytes: int = 2) -> float:
    """Peak activation bytes per GPU with per-layer activation checkpointing (see module docstring)."""
    tokens = micro_batch * seq_len
    h, inter = model.hidden, model.intermediate
    checkpoints = model.num_layers * tokens * h * act_bytes
    # One recomputed layer: norm in/out, q, k, v, attention out, residual, norm out (6h + 2 kv) and the
    # gated FFN's gate, up, act(gate), act(gate)*up (4 I); doubled for their gradients in flight.
    one_layer = 2 * tokens * (6 * h + 2 * model.kv_dim + 4 * inter) * act_bytes
    logits = tokens * model.vocab * LOGIT_BYTES
    return checkpoints + one_layer + logits


def _deepspeed_estimate(params: int, largest_layer: int, s: PlanSettings) -> tuple[int, int]:
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    cpu_mem, gpu_mem, _ = estimate_zero3_model_states_mem_needs(
        total_params=params, largest_layer_params=largest_layer, num_gpus_per_node=s.gpus_per_node,
        num_nodes=s.nodes, cpu_offload=s.offload or s.offload_params, cpu_offload_params=s.offload_params,
        zero_init=True)
    return cpu_mem, gpu_mem


# ---------------------------------------------------------------- output

def format_plan(plan: MemoryPlan) -> str:
    """The human-readable report; its last line is the verdict."""
    m, s = plan.model, plan.settings
    offload = "optimizer+params" if s.offload_params else ("optimizer" if s.offload else "none")
    lines = [
        f"model {m.name}: {m.total_params / 1e9:.3f}B params, FFN gate/up/down {m.ffn_params / 1e9:.3f}B "
        f"({m.ffn_params / m.total_params:.1%}) in {m.ffn_layers} layers, hidden {m.hidden}",
        f"cluster: {s.nodes} node(s) x {s.gpus_per_node} GPUs = {s.world_size} ZeRO-3 ranks, "
        f"{s.gpu_memory_gib:g} GiB/GPU, {s.host_memory_gib:g} GiB host/node, offload {offload}, {s.dtype}",
        f"update {s.update}: {plan.trainable_params / 1e6:,.1f}M trainable params "
        f"({plan.trainable_params / m.total_params:.4%}); "
        + (f"rank {s.lora_rank} on {','.join(s.lora_targets)}" if s.update == "lora" else
           f"{plan.neurons:,} selected neurons (neuron_fraction {s.neuron_fraction:g})"),
        f"workload: micro batch {s.micro_batch} x {s.seq_len} tokens, activation checkpointing per layer",
        "",
        "per GPU:",
    ]
    lines += [f"  {name:<32}{value / GIB:9.2f} GiB" for name, value in plan.gpu.items()]
    lines.append(f"  {'total':<32}{plan.gpu_total / GIB:9.2f} GiB of {s.gpu_memory_gib:g}")
    lines.append("host per node:")
    lines += [f"  {name:<32}{value / GIB:9.2f} GiB" for name, value in plan.host.items()]
    lines.append(f"  {'total':<32}{plan.host_total / GIB:9.2f} GiB of {s.host_memory_gib:g}")
    full_cpu, full_gpu = plan.deepspeed_full
    sub_cpu, sub_gpu = plan.deepspeed_trainable
    frozen_gib = DTYPE_BYTES[s.dtype] * (m.total_params - (m.ffn_params if s.update == "mask" else 0)) / s.world_size
    lines += [
        "DeepSpeed estimate_zero3_model_states_mem_needs (model states only, zero_init, buffer factor 1.5):",
        f"  full fine-tuning (every param trainable): {full_gpu / GIB:.2f} GiB/GPU, {full_cpu / GIB:.2f} GiB host/node",
        f"  trainable subset alone: {sub_gpu / GIB:.2f} GiB/GPU (+ {frozen_gib / GIB:.2f} GiB frozen weights), "
        f"{sub_cpu / GIB:.2f} GiB host/node",
        plan.verdict(),
    ]
    return "\n".join(lines)


TABLE_MODELS = ("llava-1.5-7b", "qwen2-vl-72b", "llama-3.2-90b-vision")


def plan_table_markdown(models: tuple[str, ...] = TABLE_MODELS, node_counts: tuple[int, ...] = (1, 8),
                        **overrides) -> str:
    """Markdown table: per-GPU GiB and verdict for each preset x nodes x update x offload (8x80 GiB nodes)."""
    header = ["model", "nodes x GPUs", "update", "no offload: GiB/GPU", "no offload", "offload: GiB/GPU",
              "offload: host GiB/node", "offload"]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in models:
        inv = inventory(name)
        for nodes in node_counts:
            for update in ("mask", "delta"):
                plain = plan_memory(inv, PlanSettings(nodes=nodes, gpus_per_node=8, update=update, **overrides))
                off = plan_memory(inv, PlanSettings(nodes=nodes, gpus_per_node=8, update=update, offload=True,
                                                    **overrides))
                rows.append(f"| {name} | {nodes}x8 | {update} | {plain.gpu_total / GIB:.1f} | "
                            f"{_short_verdict(plain)} | {off.gpu_total / GIB:.1f} | {off.host_total / GIB:.0f} | "
                            f"{_short_verdict(off)} |")
    s = PlanSettings(**overrides)
    rows.append("")
    rows.append(f"{s.dtype}, micro batch {s.micro_batch} x {s.seq_len} tokens, activation checkpointing, "
                f"{s.gpu_memory_gib:g} GiB GPUs, {s.host_memory_gib:g} GiB host per node, neuron fraction "
                f"{s.neuron_fraction:g}; offload = DeepSpeed offload_optimizer=cpu.")
    return "\n".join(rows)


def _short_verdict(plan: MemoryPlan) -> str:
    return "fits" if plan.fits else "does not fit"


def build_parser() -> argparse.ArgumentParser:
    parser = ToolParser(prog="python -m shield_ds.plan", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", help=f"config.json, checkpoint dir, hub name or preset {list(PRESETS)}")
    parser.add_argument("--nodes", type=int, default=1, help="nodes")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs (ranks) per node")
    parser.add_argument("--update", choices=UPDATES, default="mask", help="what is trainable")
    parser.add_argument("--offload", action="store_true", help="DeepSpeed offload_optimizer=cpu")
    parser.add_argument("--offload-params", action="store_true", help="also offload_param=cpu (implies --offload)")
    parser.add_argument("--gpu-memory", type=float, default=DEFAULT_GPU_MEMORY_GIB, help="GiB per GPU")
    parser.add_argument("--host-memory", type=float, default=DEFAULT_HOST_MEMORY_GIB, help="GiB host RAM per node")
    parser.add_argument("--micro-batch", type=int, default=DEFAULT_MICRO_BATCH, help="sequences per GPU")
    parser.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN, help="tokens incl. image tokens")
    parser.add_argument("--neuron-fraction", type=float, default=DEFAULT_NEURON_FRACTION,
                        help="trained parameters / total parameters (mask, delta)")
    parser.add_argument("--lora-rank", type=int, default=DEFAULT_LORA_RANK, help="LoRA rank (--update lora)")
    parser.add_argument("--lora-targets", default=",".join(LORA_TARGETS),
                        help="comma-separated decoder-layer projections LoRA adapts (--update lora)")
    parser.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default="bf16", help="training dtype")
    parser.add_argument("--table", action="store_true", help="print the README table for the three presets")
    return parser


@exit_on_error
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.table:
        print(plan_table_markdown())
        return
    if not args.model:
        raise ShieldError("--model is required (or use --table)")
    settings = PlanSettings(nodes=args.nodes, gpus_per_node=args.gpus_per_node, update=args.update,
                            offload=args.offload or args.offload_params, offload_params=args.offload_params,
                            gpu_memory_gib=args.gpu_memory, host_memory_gib=args.host_memory,
                            micro_batch=args.micro_batch, seq_len=args.seq_len,
                            neuron_fraction=args.neuron_fraction, lora_rank=args.lora_rank,
                            lora_targets=tuple(t for t in args.lora_targets.split(",") if t), dtype=args.dtype)
    print(format_plan(plan_memory(inventory(args.model), settings)))


if __name__ == "__main__":
    sys.exit(main())
