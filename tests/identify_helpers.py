"""Helpers for identify tests: a tiny checkpoint with planted neurons, and small JSONL data sets."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from shield_ds.models import get_adapter

MARKER = "~"


@torch.no_grad()
def plant_neurons(src: Path, dst: Path, planted: dict[int, list[int]], marker: str = MARKER,
                  down_scale: dict[int, float] | None = None) -> None:
    """Copy a tiny llava checkpoint, editing it so `planted` neurons fire only in prompts with `marker`.

    Residual dimension k is reserved: only the marker's embedding writes it, and one attention value
    channel per layer copies it to the positions after the marker (o_proj writes nothing else to k,
    and nothing else reads it). The planted neurons' gate/up rows read only k, so their activation is
    exactly silu(0) * 0 = 0 in prompts without the marker and positive from the marker on. Every other
    neuron has a zero weight on k, so the marker only rescales its inputs (through the norms).
    The planted neurons write only into k (small down columns, so saliency still sees them);
    `down_scale` multiplies a layer's planted down columns (saliency scale growing with depth).
    """
    model = AutoModelForImageTextToText.from_pretrained(src, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(src)
    adapter = get_adapter(model.config)
    (marker_id,) = processor.tokenizer(marker, add_special_tokens=False)["input_ids"]
    text = model.config.text_config
    hidden, head_dim = text.hidden_size, text.head_dim
    q_per_kv = text.num_attention_heads // text.num_key_value_heads
    k = hidden - 1
    embed = model.get_input_embeddings().weight
    embed[:, k] = 0.0
    embed[marker_id] = 0.0
    embed[marker_id, k] = 10.0
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        if "language_model" in name and module.in_features == hidden:
            module.weight[:, k] = 0.0  # q, k, v, gate, up: nobody reads dimension k ...
        if ("language_model" in name or "multi_modal_projector" in name) and module.out_features == hidden:
            module.weight[k, :] = 0.0  # o_proj, down_proj, projector: ... and nobody writes it
            if module.bias is not None:
                module.bias[k] = 0.0
    for index, layer in enumerate(adapter.decoder_layers(model)):
        attn = layer.self_attn
        attn.v_proj.weight[0, :] = 0.0  # value channel 0 of kv head 0 carries dimension k only
        attn.v_proj.weight[0, k] = 1.0
        for head in range(q_per_kv):  # the query heads that read kv head 0
            attn.o_proj.weight[:, head * head_dim] = 0.0
        attn.o_proj.weight[k, 0] = 1.0
        ffn = adapter.ffn(layer)
        for i in planted.get(index, []):
            for proj in ffn.rows.values():
                proj.weight[i, :] = 0.0
                proj.weight[i, k] = 3.0
            ffn.down.weight[:, i] = 0.0  # what a planted neuron writes stays in dimension k
            ffn.down.weight[k, i] = 0.05 * (down_scale or {}).get(index, 1.0)
    model.save_pretrained(dst)
    processor.save_pretrained(dst)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def marker_datasets(tmp: Path, multiq_prompts: list[str], repeats: int = 1) -> tuple[Path, Path]:
    """Benign: plain prompts. Harmful: the same prompts with the marker inserted (the only difference)."""
    benign = [{"id": f"b{i}", "prompt": p, "language": "en", "label": "benign"} for i, p in enumerate(multiq_prompts)]
    harmful = [{"id": f"h{i}", "prompt": MARKER * repeats + " " + p, "language": "en", "label": "harmful"}
               for i, p in enumerate(multiq_prompts)]
    return write_jsonl(tmp / "harmful.jsonl", harmful), write_jsonl(tmp / "benign.jsonl", benign)
