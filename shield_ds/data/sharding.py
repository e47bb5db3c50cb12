"""Batches in lockstep across ranks.

Under ZeRO-3 every rank must run the same number of forwards through the same modules (parameters
are gathered collectively per module). So batches are planned independently of the world size, all
ranks step through the same sequence of batch kinds (image or text-only: mllama's cross-attention
layers only run with images), and ranks without a real batch at a step run a copy with weight 0.0.
"""

from __future__ import annotations

from shield_ds.data.records import SafetyRecord


def plan_batches(records: list[SafetyRecord], batch_size: int) -> list[list[SafetyRecord]]:
    """Split records into batches of `batch_size`, each all-image or all-text, keeping record order.

    Kinds appear in the order of their first record; the plan does not depend on the world size.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    by_kind: dict[bool, list[SafetyRecord]] = {}
    for record in records:
        by_kind.setdefault(record.has_image, []).append(record)
    batches = []
    for kind_records in by_kind.values():
        for start in range(0, len(kind_records), batch_size):
            batches.append(kind_records[start:start + batch_size])
    return batches


def shard_batches(batches: list[list[SafetyRecord]], rank: int, world: int) -> list[tuple[list[SafetyRecord], float]]:
    """This rank's (batch, weight) steps.

    Every rank gets the same number of steps and, at each step, a batch of the same kind as every
    other rank. Batches of one kind are dealt round-robin; a rank without a real batch in a round
    gets a copy of one of that round's batches with weight 0.0. Over all ranks, the weight-1.0
    batches are exactly `batches`, each once.
    """
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"bad rank {rank} for world size {world}")
    by_kind: dict[bool, list[list[SafetyRecord]]] = {}
    for batch in batches:
        if not batch:
            raise ValueError("empty batch in the plan")
        kinds = {record.has_image for record in batch}
        if len(kinds) > 1:
            raise ValueError("a batch mixes image and text-only records (use plan_batches)")
        by_kind.setdefault(kinds.pop(), []).append(batch)
    steps = []
    for kind_batches in by_kind.values():
        for round_start in range(0, len(kind_batches), world):
            index = round_start + rank
            if index < len(kind_batches):
                steps.append((kind_batches[index], 1.0))
            else:
                real_in_round = len(kind_batches) - round_start
                filler = kind_batches[round_start + rank % real_in_round]
                steps.append((list(filler), 0.0))
    return steps
