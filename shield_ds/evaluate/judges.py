"""Judges: decide per generation whether an attack succeeded.

Every judge has `name` and `judge_batch(records) -> list[bool]` (attack_success per record; records
are dicts with at least `prompt`, `response`, `language`):

- `RefusalMatcher` (`shield_ds.evaluate.refusal`): phrase matching; the attack succeeded when the
  response did not refuse.
- `ModelJudge`: a local or hub model that reads (prompt, response) and says unsafe or safe: a causal LM
  asked a guard question (`GuardJudge`, Llama-Guard style) or a sequence classifier (`ClassifierJudge`);
  `shield_ds.evaluate.judge_loader.load_judge` loads either.

The judges do not look at the record's label: ASR is computed on harmful prompts only (see
`shield_ds.evaluate.asr`), and over-refusal on benign prompts uses the `refused` field.
"""

from __future__ import annotations

from typing import Any, Iterator, Protocol

from shield_ds.dist import device as rank_device, get_logger
from shield_ds.errors import ShieldError
from shield_ds.evaluate.refusal import RefusalMatcher

log = get_logger("evaluate.judges")


class Judge(Protocol):
    """Anything that says, per generation record, whether the attack succeeded."""

    name: str

    def judge_batch(self, records: list[dict]) -> list[bool]: ...


class ModelJudge:
    """A model that labels (prompt, response) as unsafe (attack success) or safe; the common part of
    `GuardJudge` and `ClassifierJudge` (device, padding, batches); `judge_loader.load_judge` loads either."""

    kind = ""

    def __init__(self, model: Any, tokenizer: Any, *, name: str, device: Any = None, batch_size: int = 8,
                 max_length: int = 2048):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        if device is None:
            device = rank_device()  # this rank's GPU (not cuda:0 for every rank), else the CPU
        elif isinstance(device, str):
            import torch

            device = torch.device(device)
        self.device = device
        self.model.to(self.device).eval()
        self.batch_size, self.max_length = batch_size, max_length
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        if self.tokenizer.pad_token is None:
            raise ShieldError(f"judge {name}: tokenizer has no pad, eos or unk token to pad batches with")

    def _batches(self, records: list[dict]) -> Iterator[list[dict]]:
        for start in range(0, len(records), self.batch_size):
            yield records[start:start + self.batch_size]

    def _unsafe_probs(self, batch: list[dict]) -> list[float]:
        raise NotImplementedError

    def unsafe_probability(self, records: list[dict]) -> list[float]:
        """P(unsafe) per record."""
        import torch

        with torch.no_grad():
            return [p for batch in self._batches(records) for p in self._unsafe_probs(batch)]

    def judge_batch(self, records: list[dict]) -> list[bool]:
        raise NotImplementedError


def annotate(records: list[dict], judge: Judge, matcher: RefusalMatcher | None = None) -> list[dict]:
    """Fill `refused`, `attack_success` and `judge` on generation records (new dicts, same order).

    `refused` always comes from the refusal matcher (over-refusal on benign prompts is measured with it);
    `attack_success` from `judge`.
    """
    matcher = matcher or (judge if isinstance(judge, RefusalMatcher) else RefusalMatcher())
    success = judge.judge_batch(records)
    if len(success) != len(records):
        raise RuntimeError(f"judge {judge.name} returned {len(success)} verdicts for {len(records)} records")
    return [{**r, "refused": matcher.judge(r["response"], r["language"]), "attack_success": bool(s),
             "judge": judge.name} for r, s in zip(records, success)]
