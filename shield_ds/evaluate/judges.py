"""Judges: decide per generation whether an attack succeeded.

Every judge has `name` and `judge_batch(records) -> list[bool]` (attack_success per record; records
are dicts with at least `prompt`, `response`, `language`):

- `RefusalMatcher` (`shield_ds.evaluate.refusal`): phrase matching; the attack succeeded when the
  response did not refuse.
- `ModelJudge.from_pretrained` (the factory): a local or hub model that reads (prompt, response) and
  says unsafe or safe: a causal LM asked a guard question (`GuardJudge`, Llama-Guard style) or a
  sequence classifier (`ClassifierJudge`).

The judges do not look at the record's label: ASR is computed on harmful prompts only (see
`shield_ds.evaluate.asr`), and over-refusal on benign prompts uses the `refused` field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Protocol

from shield_ds.dist import device as rank_device, get_logger
from shield_ds.errors import ShieldError, first_line
from shield_ds.evaluate.refusal import RefusalMatcher

log = get_logger("evaluate.judges")


class Judge(Protocol):
    """Anything that says, per generation record, whether the attack succeeded."""

    name: str

    def judge_batch(self, records: list[dict]) -> list[bool]: ...


def _looks_like_path(name: str) -> bool:
    """Local-path spellings that a hub id (`org/name`) can never have."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name or Path(name).exists()


class ModelJudge:
    """A model that labels (prompt, response) as unsafe (attack success) or safe; the common part of
    `GuardJudge` and `ClassifierJudge` (device, padding, batches) and the factory that loads either."""

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

    @classmethod
    def from_pretrained(cls, path_or_name: str | Path, *, kind: str = "auto", device: str | None = None,
                        dtype: str = "auto", **kwargs: Any) -> "ModelJudge":
        """Load a judge from a local directory or a hub id: a `GuardJudge` (kind "guard", a causal LM) or a
        `ClassifierJudge` (kind "classifier"); kind "auto" picks by the architecture. `kwargs` go to the
        judge's constructor."""
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

        from shield_ds.evaluate.classifier_judge import ClassifierJudge
        from shield_ds.evaluate.guard_judge import GuardJudge

        name = str(path_or_name)
        if kind not in ("auto", "guard", "classifier"):
            raise ShieldError(f"judge {name}: kind must be 'auto', 'guard' or 'classifier', not {kind!r}")
        if _looks_like_path(name) and not Path(name).expanduser().is_dir():
            what = "not a model directory" if Path(name).expanduser().exists() else "no such directory"
            raise ShieldError(f"judge model {name}: {what}")
        source = str(Path(name).expanduser()) if Path(name).expanduser().is_dir() else name
        try:
            config = AutoConfig.from_pretrained(source)
        except Exception as exc:
            raise ShieldError(f"judge model {name}: cannot load its config ({first_line(exc)})") from None
        if kind == "auto":
            archs = config.architectures or []
            if any(a.endswith("ForSequenceClassification") for a in archs):
                kind = "classifier"
            elif any(a.endswith(("ForCausalLM", "ForConditionalGeneration")) for a in archs):
                kind = "guard"
            else:
                raise ShieldError(f"judge model {name}: cannot tell its kind from architectures {archs}; "
                                  "pass kind='guard' or kind='classifier'")
        torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
        loader = AutoModelForSequenceClassification if kind == "classifier" else AutoModelForCausalLM
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
            model = loader.from_pretrained(source, dtype=torch_dtype)
        except Exception as exc:
            raise ShieldError(f"judge model {name}: cannot load it as a {kind} ({first_line(exc)})") from None
        log.info("judge %s loaded as %s", name, kind)
        judge_class = ClassifierJudge if kind == "classifier" else GuardJudge
        return judge_class(model, tokenizer, name=name, device=device, **kwargs)

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
