"""Stage 3: generate, judge and tabulate attack success per language x modality (the `Evaluator` recipe)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shield_ds import dist
from shield_ds.config import DataConfig, InferenceConfig, Modality, Split, option, redefault
from shield_ds.engine import ShieldEngine, resolve_ds_config
from shield_ds.errors import ShieldError
from shield_ds.io import write_json, write_text
from shield_ds.data.splits import OVERLAP_NOTE, overlap_note, trained_overlap
from shield_ds.evaluate.ablation import ablate_neurons, random_like
from shield_ds.evaluate.asr import (asr_table, compare, compare_markdown, compare_page, generation_rows, overall,
                                    write_asr_reports, write_generations)
from shield_ds.evaluate.generate import generate_responses
from shield_ds.evaluate.judge_loader import load_judge
from shield_ds.evaluate.judges import annotate
from shield_ds.evaluate.refusal import RefusalMatcher
from shield_ds.evaluate.utility import UtilityProbe
from shield_ds.models import config_hash, get_adapter, load_config
from shield_ds.neurons import NeuronSet
from shield_ds.tables import markdown_table, rows_to_csv

log = dist.get_logger("evaluate")


@dataclass
class EvalConfig(DataConfig, InferenceConfig):
    """Stage 3's options (with the shared data and engine options)."""

    modalities: list[Modality] = redefault(DataConfig, "modalities", ["text", "typographic"])
    split: Split = redefault(DataConfig, "split", "test")
    batch_size: int = option(8, "prompts per generation batch per rank")
    max_new_tokens: int = option(64, "answer length limit")
    judge: str | None = option(None, "model judge (causal-LM guard or sequence classifier); default: refusal matcher")
    refusal_phrases: str | None = option(None, "JSON/YAML file of extra refusal phrases per language")
    out: str = option("runs/evaluate", "output directory")
    compare: str | None = option(None, "an earlier evaluate --out directory (e.g. the base model's)")
    allow_overlap: bool = option(False, "--compare even when the model was trained on evaluated prompts "
                                 "(titled as such)")
    reference_answers: str | None = option(None, "generations.jsonl whose benign answers the utility NLL scores "
                                           "(default: --compare's generations, else this run's own)")
    ablate: str | None = option(None, "identify output: zero these neurons (plus random controls)")
    ablate_controls: int = option(3, "random control sets for --ablate")


class Evaluator:
    """Generates on every rank (its shard of the prompts; in lockstep under ZeRO-3), judges on rank 0,
    writes the ASR tables."""

    def __init__(self, cfg: EvalConfig):
        self.cfg = cfg
        self.out = Path(cfg.out)

    def _records(self) -> list:
        return self.cfg.load_records(require=("harmful",), evaluation=True)

    def _overlap_note(self, overlap: int) -> str:
        """The compare table's title note; an overlap with the trained prompts is refused without --allow-overlap."""
        cfg = self.cfg
        if overlap:
            log.warning("%s was trained on %d of the evaluated prompts (--split %s)", cfg.model, overlap, cfg.split)
        if not cfg.compare:
            return ""
        if overlap and not cfg.allow_overlap:
            raise ShieldError(f"{cfg.model}: trained on {overlap} of the evaluated prompts (--split {cfg.split}); "
                              "evaluate on --split test or pass --allow-overlap")
        return OVERLAP_NOTE if overlap else overlap_note([cfg.compare], cfg.allow_overlap)

    def _judges(self):
        """(attack-success judge, refusal matcher); a bad judge path fails on every rank before any work."""
        matcher = RefusalMatcher.from_file(self.cfg.refusal_phrases) if self.cfg.refusal_phrases else RefusalMatcher()
        if self.cfg.judge is None:
            return matcher, matcher
        error, judge = None, None
        if dist.is_rank0():
            try:
                judge = load_judge(self.cfg.judge)
            except ShieldError as exc:
                error = str(exc)
        error = dist.broadcast_object(error)
        if error:
            raise ShieldError(error)
        return judge, matcher

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        adapter = get_adapter(load_config(cfg.model))
        adapter.check_modalities(cfg.modalities)
        records = self._records()
        ablate_set = NeuronSet.load(cfg.ablate) if cfg.ablate else None
        if cfg.compare and not (Path(cfg.compare) / "asr.json").is_file():
            raise ShieldError(f"{cfg.compare}: no asr.json to compare with (run evaluate there first)")
        overlap = trained_overlap(records, cfg.model)
        provenance = cfg.split_spec.provenance(records)
        note = self._overlap_note(overlap)
        judge, matcher = self._judges()

        probe = UtilityProbe(cfg, records, self.out, config_hash(load_config(cfg.model)))

        ds_config = None
        if cfg.ds_config is not None:
            ds_config = resolve_ds_config(cfg.ds_config, micro_batch_size=cfg.batch_size, overrides=cfg.ds_overrides)
        inference = ShieldEngine.load(cfg.model, ds_config, mode="infer", zero=cfg.zero)
        loaded, model, device, dtype = inference.loaded, inference.module, inference.device, inference.dtype
        zero3 = inference.zero3
        if ablate_set is not None:
            ablate_set.check_matches(config_hash(loaded.config), adapter.num_layers(loaded.config),
                                     adapter.intermediate_size(loaded.config), adapter.hidden_size(loaded.config),
                                     where=f"neuron set {cfg.ablate}", model=str(cfg.model))

        def generate(desc: str) -> dict[str, str]:
            return generate_responses(model, loaded.processor, adapter, records, batch_size=cfg.batch_size,
                                      max_new_tokens=cfg.max_new_tokens, dtype=dtype, zero3=zero3, device=device,
                                      desc=desc)

        def judged(responses: dict[str, str]) -> list[dict]:
            return annotate(generation_rows(records, responses), judge, matcher)

        started = time.perf_counter()
        responses = generate("evaluate")
        summary: dict[str, Any] = {"generate_seconds": round(time.perf_counter() - started, 3)}
        summary["utility"] = probe.measure(model, loaded.processor, adapter, responses, dtype=dtype, device=device)
        if dist.is_rank0():
            rows = judged(responses)
            write_generations(self.out / "generations.jsonl", rows)
            table = asr_table(rows)
            write_asr_reports(table, self.out, meta={
                **provenance, "trained_overlap": overlap,
                "zero": inference.zero, "world_size": dist.world_size()})
            summary["asr"] = overall(rows)
            print(table_text(table), flush=True)
            if cfg.compare:
                cmp_rows = compare(cfg.compare, self.out, out_dir=self.out)
                write_text(self.out / "compare.md", compare_page(cmp_rows, note))
                print(compare_markdown(cmp_rows), flush=True)
            probe.write(summary["utility"])
        if ablate_set is not None:
            summary["ablation"] = self._ablation(model, adapter, ablate_set, generate, judged, responses, provenance)
        if dist.is_rank0():
            write_json(self.out / "evaluate.json", {"config": cfg.__dict__, "world_size": dist.world_size(),
                                                    "threads": dist.thread_choice(), "zero": inference.zero,
                                                    **provenance, **summary})
        dist.barrier()
        return summary

    def _ablation(self, model, adapter, neuron_set, generate, judged, base_responses,
                  provenance: dict[str, Any]) -> list[dict]:
        """Answers with the set's neurons zeroed, and with random controls; ablation.json/.csv/.md on rank 0
        (the JSON: the evaluated prompts' split provenance and `variants`, one row per ablation)."""
        variants = [("safety neurons", neuron_set)] + [(f"random control (seed {s})", random_like(neuron_set, s))
                                                       for s in range(self.cfg.ablate_controls)]
        base = overall(judged(base_responses)) if dist.is_rank0() else {}
        results = []
        for name, subset in variants:
            with ablate_neurons(model, adapter, subset):
                responses = generate(f"ablate: {name}")
            if dist.is_rank0():
                rates = overall(judged(responses))
                results.append({"variant": name, "neurons": subset.count, **rates,
                                "delta_harmful_refusal": rates["harmful_refusal"] - base["harmful_refusal"],
                                "delta_asr": rates["asr"] - base["asr"],
                                "changed_responses": sum(responses[k] != base_responses[k] for k in responses)})
        if dist.is_rank0():
            results.insert(0, {"variant": "none (base)", "neurons": 0, **base, "delta_harmful_refusal": 0.0,
                               "delta_asr": 0.0, "changed_responses": 0})
            write_text(self.out / "ablation.csv", rows_to_csv(results))
            write_json(self.out / "ablation.json", {**provenance, "variants": results})
            md = markdown_table(["ablated", "neurons", "harmful refusal", "ASR", "benign over-refusal", "Δ refusal",
                                 "Δ ASR", "changed answers"],
                                [[r["variant"], str(r["neurons"]), f"{r['harmful_refusal']:.1%}", f"{r['asr']:.1%}",
                                  f"{r['benign_over_refusal']:.1%}", f"{r['delta_harmful_refusal']:+.1%}",
                                  f"{r['delta_asr']:+.1%}", str(r["changed_responses"])] for r in results])
            write_text(self.out / "ablation.md", md + "\n")
            print(md, flush=True)
        return results


def table_text(table) -> str:
    """A compact ASR table for the console."""
    body = []
    for lang in table.languages:
        row = [lang]
        for mod in table.modalities:
            cell = table.cell(lang, mod)
            row.append("-" if cell is None or cell.attacks.n == 0 else
                       f"{cell.attacks.rate:.0%} ({cell.attacks.successes}/{cell.attacks.n})")
        body.append(row)
    text = markdown_table(["ASR", *table.modalities], body)
    forms = [r for r in table.form_rows() if r["language"] == "all"]
    if forms:
        text += "\n\nover-refusal by form: " + ", ".join(
            f"{r['form']} {r['over_refusal']:.0%} ({r['benign_refusals']}/{r['benign_n']})" for r in forms)
    sources = table.source_rows()
    if len(sources) > 1:
        text += "\nASR by harmful source: " + ", ".join(
            f"{r['source']} {r['asr']:.0%} ({r['attack_successes']}/{r['harmful_n']})" for r in sources)
    return text
