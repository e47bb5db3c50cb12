"""Greedy generation on any world size, in lockstep under ZeRO-3, gathered on every rank.

Every rank generates for its shard of batches (`shard_batches`, so all ranks run the same number
of `generate` calls on the same kind of input); with ZeRO-3 and more than one rank `synced_gpus`
keeps the ranks stepping together until all of them are done. A replica per rank (`zero3` False)
needs no lockstep: each rank runs its real batches only (skipping `shard_batches`' zero-weight
fillers) with the KV cache. Results do not depend on the world size: the batch plan does not, and
greedy decoding of a batch does not see other batches.
"""

from __future__ import annotations

from typing import Sequence

import torch

from shield_ds import dist
from shield_ds.data import SafetyCollator, plan_batches, shard_batches


@torch.no_grad()
def generate_responses(model: torch.nn.Module, processor, adapter, records: Sequence, *, batch_size: int = 8,
                       max_new_tokens: int = 64, dtype: torch.dtype = torch.float32, zero3: bool = False,
                       device: torch.device | None = None, desc: str = "generate",
                       return_finished: bool = False) -> dict[str, str] | dict[str, tuple[str, bool]]:
    """{record id: generated text} for all records, identical on every rank.

    `return_finished`: values are (text, finished), finished False when the answer reached
    `max_new_tokens` without an end-of-sequence token.
    """
    device = device or dist.device()
    collator = SafetyCollator(processor, adapter)
    tokenizer = getattr(processor, "tokenizer", processor)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    steps = shard_batches(plan_batches(list(records), batch_size), dist.rank(), dist.world_size())
    synced = zero3 and dist.world_size() > 1
    eos = model.generation_config.eos_token_id if getattr(model, "generation_config", None) is not None else None
    eos_ids = torch.tensor(sorted({*(eos if isinstance(eos, (list, tuple)) else [eos]), tokenizer.eos_token_id} - {None}),
                           dtype=torch.long)
    mine: dict = {}
    if not synced:
        steps = [step for step in steps if step[1] > 0]
    for batch_records, weight in dist.progress(steps, desc=desc, unit="batch"):
        batch = collator(batch_records).to(device, float_dtype=dtype)
        out = model.generate(**batch.inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                             pad_token_id=pad_id, synced_gpus=synced, use_cache=True)
        new_tokens = out[:, batch.inputs["input_ids"].shape[1]:]
        texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        if weight > 0 and return_finished:
            ended = torch.isin(new_tokens.cpu(), eos_ids).any(1) | (new_tokens.shape[1] < max_new_tokens)
            mine.update({r.id: (t, bool(e)) for r, t, e in zip(batch_records, texts, ended.tolist())})
        elif weight > 0:
            mine.update({r.id: t for r, t in zip(batch_records, texts)})
    merged: dict = {}
    for part in dist.all_gather_object(mine):
        merged.update(part or {})
    return merged
