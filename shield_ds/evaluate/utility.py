"""Utility drift: the evaluated model's per-token NLL of the base model's greedy answers to the benign prompts.

Reference answers, in order of precedence:
- `--reference-answers FILE` (a generations.jsonl; its benign rows);
- `--compare DIR`: the benign rows of DIR/generations.jsonl (the compared run's greedy answers; DIR/asr.json
  names the model that made them);
- otherwise this run's own benign generations ("self": the base evaluation scores its own answers).

The answers used are written to OUT/reference_answers.jsonl (generation rows plus `reference`,
`reference_model`, `reference_config_hash`); a rerun into the same OUT that asks for the same reference
file, made by the same model (path and config hash, from the file's asr.json), reuses that file (the
answers stay pinned even if the source is re-evaluated or removed); "self" always scores this run's answers.

Teacher-forced NLL over the answer tokens only (prompt through the family chat template, as training's
`SafetyCollator(train=True)` and `response_nll`), batches sharded over the ranks in lockstep (every rank
runs the same number of forwards, as ZeRO-3 needs), fp32 per sample, float64 sums reduced with one
all_reduce. Empty answers are skipped.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from shield_ds import dist
from shield_ds.errors import ShieldError
from shield_ds.evaluate.asr import ASR_JSON, GENERATIONS_FILE, generation_rows, read_generations, write_generations
from shield_ds.io import read_json, write_json, write_text
from shield_ds.tables import markdown_table
from shield_ds.data import SafetyCollator, plan_batches, shard_batches
from shield_ds.loss import response_nll, response_window

log = dist.get_logger("evaluate.utility")

REFERENCE_FILE = "reference_answers.jsonl"
SELF = "self"


@dataclass
class Reference:
    """Reference answers {record id: answer} and where they come from (`source`: a file path or "self")."""

    source: str
    rows: list[dict] | None  # benign generation rows; None for "self" until this run has generated
    model: str | None = None
    config_hash: str | None = None
    reused: bool = False


def _generator(generations: Path) -> tuple[str | None, str | None]:
    """(model, config hash) of the run that wrote `generations` (its directory's asr.json, else evaluate.json)."""
    asr = generations.parent / ASR_JSON
    if asr.is_file():
        data = read_json(asr)
        if isinstance(data, dict) and data.get("model"):
            return data.get("model"), data.get("config_hash")
    run = generations.parent / "evaluate.json"
    if run.is_file():
        data = read_json(run)
        if isinstance(data, dict) and isinstance(data.get("config"), dict):
            return data["config"].get("model"), None
    return None, None


def _benign_rows(path: Path) -> list[dict]:
    return [row for row in read_generations(path) if row["label"] == "benign"]


def _read_cache(path: Path, source: str, model: str | None, config_hash: str | None) -> list[dict] | None:
    """The cached rows when they were taken from `source`, made by `model` with `config_hash`; else None."""
    if not path.is_file() or model is None or config_hash is None:
        return None
    try:
        rows = read_generations(path)
    except ShieldError as exc:
        log.warning("ignoring the cached reference answers: %s", exc)
        return None
    if rows and all((r.get("reference"), r.get("reference_model"), r.get("reference_config_hash"))
                    == (source, model, config_hash) for r in rows):
        return rows
    return None


class UtilityProbe:
    """Resolves the reference answers (before the model loads), measures the NLL, writes the report."""

    def __init__(self, cfg, records: list, out: Path, config_hash: str):
        self.cfg, self.out, self.config_hash = cfg, Path(out), config_hash
        self.benign = [r for r in records if r.label == "benign"]
        self.reference: Reference | None = None
        if self.benign:
            error, reference = None, None
            if dist.is_rank0():  # one rank reads (the files need not be on every node), every rank gets the answer
                try:
                    reference = self._resolve()
                except ShieldError as exc:
                    error = str(exc)
            error, reference = dist.broadcast_object((error, reference))
            if error:
                raise ShieldError(error)
            self.reference = reference

    def _resolve(self) -> Reference | None:
        cfg = self.cfg
        if not cfg.reference_answers and not cfg.compare:  # this run's own answers (the cache only records them)
            return Reference(SELF, None, str(cfg.model), self.config_hash)
        path = Path(cfg.reference_answers) if cfg.reference_answers else Path(cfg.compare) / GENERATIONS_FILE
        source = str(path.resolve())
        model, chash = _generator(path)
        cached = _read_cache(self.out / REFERENCE_FILE, source, model, chash)
        if cached is not None:
            self._check_rows(cached, str(self.out / REFERENCE_FILE))
            log.info("reusing the reference answers in %s (from %s)", self.out / REFERENCE_FILE, source)
            return Reference(source, cached, model, chash, reused=True)
        if not path.is_file():
            if not cfg.reference_answers:
                raise ShieldError(f"{cfg.compare}: no {GENERATIONS_FILE} to take the reference answers from "
                                  "(pass --reference-answers FILE)")
            raise ShieldError(f"{path}: reference answers file not found")
        rows = _benign_rows(path)
        if not cfg.reference_answers and not self._check_rows(rows, str(path), required=False):
            log.warning("no utility drift: %s holds no answers for this run's benign prompts (another split or "
                        "language set; pass --reference-answers to choose answers)", path)
            return None
        self._check_rows(rows, str(path))
        return Reference(source, rows, model, chash)

    def _check_rows(self, rows: list[dict], where: str, required: bool = True) -> int:
        """How many answers are for this run's benign prompts (by id and prompt); none is an error when
        `required`, and an answer for another prompt under a matching id always is."""
        expected = {row["id"]: row["prompt"] for row in generation_rows(self.benign, {r.id: "" for r in self.benign})}
        matched = 0
        for row in rows:
            key = str(row["id"])
            if key in expected:
                if row["prompt"] != expected[key]:
                    raise ShieldError(f"{where}: the answer for id {key} was made for another prompt "
                                      f"({row['prompt'][:40]!r}, here {expected[key][:40]!r})")
                matched += 1
        if not matched and required:
            raise ShieldError(f"{where}: holds no answers for this run's {len(self.benign)} benign prompts")
        return matched

    def measure(self, model: torch.nn.Module, processor, adapter, responses: dict[str, str], *,
                dtype: torch.dtype, device: torch.device) -> dict[str, Any] | None:
        """The utility block (identical on every rank); None without benign prompts. Runs on every rank."""
        if self.reference is None:
            return None
        ref = self.reference
        if ref.rows is None:  # self: this run's own greedy answers
            answers = {r.id: responses[r.id] for r in self.benign}
        else:
            answers = {str(row["id"]): row["response"] for row in ref.rows}
        items = [dataclasses.replace(r, response=answers[r.id]) for r in self.benign
                 if r.id in answers and answers[r.id].strip()]
        nll, tokens, counted = answer_nll(model, processor, adapter, items, batch_size=self.cfg.batch_size,
                                          dtype=dtype, device=device)
        return {"benign_answer_nll": nll / tokens if tokens else None, "tokens": tokens, "answers": counted,
                "skipped_empty": sum(1 for r in self.benign if r.id in answers and not answers[r.id].strip()),
                "missing": sum(1 for r in self.benign if r.id not in answers),
                "reference": ref.source, "reference_model": ref.model, "reference_config_hash": ref.config_hash}

    def write(self, utility: dict[str, Any] | None) -> None:
        """Rank 0: the cache, asr.json's `model`/`config_hash`/`utility`, compare.md's utility lines; prints them."""
        asr_path = self.out / ASR_JSON
        table = read_json(asr_path)
        table.update({"model": str(self.cfg.model), "config_hash": self.config_hash})
        if utility is None:
            write_json(asr_path, table)
            return
        ref = self.reference
        if ref.rows is None:  # self: the benign rows this run has just written, with their verdicts
            ref.rows = _benign_rows(self.out / GENERATIONS_FILE)
        if not ref.reused:
            write_generations(self.out / REFERENCE_FILE,
                              [{**row, "reference": ref.source, "reference_model": ref.model,
                                "reference_config_hash": ref.config_hash} for row in ref.rows])
        before = None
        if self.cfg.compare:
            old = read_json(Path(self.cfg.compare) / ASR_JSON)
            before = (old.get("utility") or {}).get("benign_answer_nll") if isinstance(old, dict) else None
            utility["compare_benign_answer_nll"] = before
            now = utility["benign_answer_nll"]
            utility["nll_drift"] = None if before is None or now is None else now - before
        table["utility"] = utility
        write_json(asr_path, table)
        text = utility_markdown(utility)
        if self.cfg.compare and (self.out / "compare.md").is_file():
            md = (self.out / "compare.md").read_text(encoding="utf-8").rstrip("\n")
            write_text(self.out / "compare.md", md + "\n\n" + text + "\n")
        print(text, flush=True)


def _fmt(value: float | None, sign: bool = False) -> str:
    return "–" if value is None or not math.isfinite(value) else (f"{value:+.4f}" if sign else f"{value:.4f}")


def utility_markdown(utility: dict[str, Any]) -> str:
    """Utility: the per-token NLL of the reference answers (and its drift vs the compared run)."""
    header = ["utility", "benign answer NLL / token", "answers", "tokens"]
    row = ["this model", _fmt(utility["benign_answer_nll"]), str(utility["answers"]), str(utility["tokens"])]
    body = [row]
    if "nll_drift" in utility:
        header.append("Δ NLL vs compared")
        body = [["compared run", _fmt(utility["compare_benign_answer_nll"]), "", "", ""],
                row + [_fmt(utility["nll_drift"], sign=True)]]
    who = utility["reference"] if utility["reference"] != SELF else "this model's own benign answers"
    return markdown_table(header, body) + f"\nReference answers: {who}.\n"


@torch.no_grad()
def answer_nll(model: torch.nn.Module, processor, adapter, records: list, *, batch_size: int,
               dtype: torch.dtype, device: torch.device) -> tuple[float, int, int]:
    """(sum of answer-token NLL, answer tokens, answers with tokens) over `records` (response = answer).

    Same on every rank: the batches are sharded in lockstep (zero-weight fillers keep the forwards equal)
    and one all_reduce sums the float64 totals.
    """
    collator = SafetyCollator(processor, adapter, train=True)
    totals = torch.zeros(3, dtype=torch.float64, device=device)
    steps = shard_batches(plan_batches(records, batch_size), dist.rank(), dist.world_size()) if records else []
    for batch_records, weight in dist.progress(steps, desc="utility", unit="batch"):
        batch = collator(batch_records, [weight] * len(batch_records)).to(device, float_dtype=dtype)
        keep = response_window(batch.labels)
        logits = model(**batch.inputs, use_cache=False, logits_to_keep=keep).logits
        nll, counts = response_nll(logits, batch.labels[:, -keep:])
        if weight > 0:
            totals += torch.stack([nll.double().sum(), counts.double().sum(), (counts > 0).double().sum()])
    dist.all_reduce(totals)
    total, tokens, answers = totals.tolist()
    return total, int(tokens), int(answers)
