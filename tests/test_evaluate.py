"""Stage 3 recipe: lockstep generation under ZeRO-3, the ablation hook, and bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import REPO, assert_one_line_error, run_deepspeed, run_python, timeout_above
from shield_ds.neurons import NeuronSet

EVALUATE = str(REPO / "recipes" / "evaluate.py")


def _args(model: Path, out: Path, *extra: str) -> list[str]:
    # 2 languages x 2 modalities x 2 labels x 3 per group = 24 records, 12 batches of 2 (uneven over ranks per kind? see plan)
    return ["--model", str(model), "--out", str(out), "--languages", "en,ar", "--modalities", "text,typographic",
            "--per-group-limit", "3", "--batch-size", "2", "--max-new-tokens", "12", *extra]


def _responses(out: Path) -> dict[str, str]:
    rows = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    return {r["id"]: r["response"] for r in rows}


@pytest.fixture(scope="module")
def one_process(tiny_checkpoint, tmp_path_factory) -> Path:
    """The reference: plain PyTorch in one process (--ds-config none)."""
    out = tmp_path_factory.mktemp("eval") / "one"
    run_python([EVALUATE, *_args(tiny_checkpoint("llava"), out, "--ds-config", "none")], timeout=300)
    return out


@pytest.mark.distributed
@timeout_above(300, 600)
def test_zero3_two_ranks_generate_like_one_process(tiny_checkpoint, one_process, tmp_path):
    model = tiny_checkpoint("llava")
    shutil.copytree(one_process, tmp_path / "one")  # this test removes one's answers further down
    run_deepspeed(EVALUATE, _args(model, tmp_path / "two", "--ds", "bf16.enabled=false",
                                  "--ds", "zero_optimization.stage3_param_persistence_threshold=0", "--zero", "on",
                                  "--compare", str(tmp_path / "one")),
                  num_ranks=2, timeout=600)
    one, two = _responses(tmp_path / "one"), _responses(tmp_path / "two")
    assert len(one) == 24 and one == two
    table = json.loads((tmp_path / "two" / "asr.json").read_text())
    assert table["zero"] == "on" and table["world_size"] == 2
    assert json.loads((tmp_path / "one" / "asr.json").read_text())["zero"] == "off"  # --ds-config none
    assert set(table["languages"]) == {"en", "ar"}
    # the default benign side (MultiQ questions + the shipped requests, equal shares) is reported per form
    forms = {r["form"]: r["benign_n"] for r in table["over_refusal_by_form"] if r["language"] == "all"}
    assert forms["question"] == 8 and sum(forms.values()) == 12 and set(forms) - {"question"} <= {"request", "borderline"}
    evaluate_json = json.loads((tmp_path / "two" / "evaluate.json").read_text())
    assert evaluate_json["threads"]["local_ranks"] == 2 and evaluate_json["generate_seconds"] > 0
    assert (tmp_path / "two" / "asr_heatmap.png").stat().st_size > 1000
    # utility: the base on its own answers (one process) and on one's answers via --compare (two ranks)
    base = json.loads((tmp_path / "one" / "asr.json").read_text())
    util, base_util = table["utility"], base["utility"]
    assert base_util["reference"] == "self" and base_util["answers"] == 12 and base_util["tokens"] > 12
    assert util["reference"] == str((tmp_path / "one" / "generations.jsonl").resolve())
    assert util["reference_config_hash"] == base["config_hash"] == table["config_hash"]
    assert (util["answers"], util["tokens"]) == (base_util["answers"], base_util["tokens"])
    assert util["benign_answer_nll"] == pytest.approx(base_util["benign_answer_nll"], rel=1e-5)
    assert util["compare_benign_answer_nll"] == base_util["benign_answer_nll"]
    assert util["nll_drift"] == pytest.approx(0.0, abs=1e-5)
    assert "Δ NLL vs compared" in (tmp_path / "two" / "compare.md").read_text()
    cached = [json.loads(line) for line in (tmp_path / "two" / "reference_answers.jsonl").read_text().splitlines()]
    assert len(cached) == 12 and {r["id"]: r["response"] for r in cached}.items() <= one.items()
    # a rerun of two with the same --compare reuses the cached answers, even after one's answers are gone
    from shield_ds.evaluate.evaluator import EvalConfig, Evaluator
    from shield_ds.evaluate.utility import UtilityProbe

    cfg = EvalConfig(model=str(model), languages=["en", "ar"], per_group_limit=3, compare=str(tmp_path / "one"),
                     out=str(tmp_path / "two"))
    records = Evaluator(cfg)._records()
    (tmp_path / "one" / "generations.jsonl").unlink()
    probe = UtilityProbe(cfg, records, tmp_path / "two", table["config_hash"])
    assert probe.reference.reused and len(probe.reference.rows) == 12


@pytest.mark.distributed
@pytest.mark.parametrize("zero", ["off", "auto"])
def test_replica_per_rank_generates_like_one_process(zero, tiny_checkpoint, one_process, tmp_path):
    """--zero off (and auto, which picks off for a model this small): a plain replica on each of 2 ranks,
    prompts sharded, no synced_gpus, answers gathered; the same answers and utility as one process."""
    out = tmp_path / "two"
    flags = ["--ds", "bf16.enabled=false"] + (["--zero", zero] if zero != "auto" else [])
    run_deepspeed(EVALUATE, _args(tiny_checkpoint("llava"), out, *flags), num_ranks=2, timeout=600)
    one, two = _responses(one_process), _responses(out)
    assert len(one) == 24 and one == two
    table, base = json.loads((out / "asr.json").read_text()), json.loads((one_process / "asr.json").read_text())
    assert table["zero"] == "off" and table["world_size"] == 2
    assert json.loads((out / "evaluate.json").read_text())["zero"] == "off"
    assert table["cells"] == base["cells"]
    assert table["utility"]["tokens"] == base["utility"]["tokens"]
    assert table["utility"]["benign_answer_nll"] == pytest.approx(base["utility"]["benign_answer_nll"], rel=1e-5)


def _direct_answer_nll(model_dir: Path, records: list, answers: dict[str, str]) -> tuple[float, int]:
    """Mean NLL per answer token, one record at a time through the plain transformers model (float64 softmax)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from shield_ds.data.images import load_image
    from shield_ds.models import get_adapter

    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    adapter = get_adapter(model.config)
    total, tokens = 0.0, 0
    for r in records:
        if not answers[r.id].strip():
            continue
        images = [load_image(r)] if r.has_image else None
        prompt = adapter.processor_inputs(processor, [adapter.chat_prompt(processor, r.prompt, r.has_image)], images)
        full = adapter.processor_inputs(processor, [adapter.chat_full(processor, r.prompt, r.has_image,
                                                                      answers[r.id])], images)
        start, ids = prompt["input_ids"].shape[1], full["input_ids"][0]
        assert torch.equal(ids[:start], prompt["input_ids"][0][:start])
        with torch.no_grad():
            logp = torch.log_softmax(model(**full).logits[0].double(), dim=-1)
        total -= float(logp[start - 1:-1].gather(1, ids[start:, None]).sum())
        tokens += len(ids) - start
    return total / tokens, tokens


def test_utility_nll_equals_a_direct_forward_and_reference_answers_are_checked(tiny_checkpoint, tmp_path):
    from shield_ds.errors import ShieldError
    from shield_ds.evaluate.evaluator import EvalConfig, Evaluator
    from shield_ds.evaluate.utility import REFERENCE_FILE, UtilityProbe

    from shield_ds.data.splits import SPLIT_PROVENANCE_KEYS
    from shield_ds.models import get_adapter, load_config

    model = tiny_checkpoint("llava")
    config = load_config(model)
    adapter = get_adapter(config)
    NeuronSet({0: torch.tensor([1, 5])}, {"num_layers": adapter.num_layers(config), "hidden_size": adapter.hidden_size(
        config), "intermediate_size": adapter.intermediate_size(config)}).save(tmp_path / "ablate")
    cfg = EvalConfig(model=str(model), languages=["en"], modalities=["text", "typographic"], per_group_limit=2,
                     batch_size=3, max_new_tokens=8, out=str(tmp_path / "base"), ds_config=None,
                     ablate=str(tmp_path / "ablate"), ablate_controls=1)
    evaluator = Evaluator(cfg)
    utility = evaluator.run()["utility"]
    # every output JSON records the split, its seed and the evaluated prompts' digest (as asr.json does)
    provenance = {k: json.loads((tmp_path / "base" / "asr.json").read_text())[k] for k in SPLIT_PROVENANCE_KEYS}
    assert provenance["split"] == "test" and len(provenance["prompt_key_digest"]) == 64
    for name in ("evaluate.json", "ablation.json"):
        written = json.loads((tmp_path / "base" / name).read_text())
        assert {k: written[k] for k in SPLIT_PROVENANCE_KEYS} == provenance, name
    variants = json.loads((tmp_path / "base" / "ablation.json").read_text())["variants"]
    assert [v["neurons"] for v in variants] == [0, 2, 2]  # base, the set, one random control
    records = [r for r in evaluator._records() if r.label == "benign"]
    answers = _responses(tmp_path / "base")
    nll, tokens = _direct_answer_nll(model, records, answers)
    assert {r.modality for r in records} == {"text", "typographic"} and utility["answers"] == 4
    assert utility["tokens"] == tokens and utility["benign_answer_nll"] == pytest.approx(nll, rel=1e-5, abs=1e-5)
    table = json.loads((tmp_path / "base" / "asr.json").read_text())
    assert table["utility"] == utility and table["model"] == str(model)

    assert (tmp_path / "base" / REFERENCE_FILE).is_file()
    # explicit reference answers: the cache file itself (a generations file) is accepted
    explicit = EvalConfig(**{**cfg.__dict__, "reference_answers": str(tmp_path / "base" / REFERENCE_FILE)})
    probe = UtilityProbe(explicit, records, tmp_path / "other", table["config_hash"])
    assert {str(r["id"]): r["response"] for r in probe.reference.rows} == {r.id: answers[r.id] for r in records}
    # answers for another prompt under the same id, no matching id, a missing file: one-line errors, nothing written
    rows = [json.loads(line) for line in (tmp_path / "base" / "generations.jsonl").read_text().splitlines()]
    bad = tmp_path / "bad.jsonl"
    for edit, needle in ((lambda r: {**r, "prompt": "something else"}, "another prompt"),
                         (lambda r: {**r, "id": "x" + str(r["id"])}, "no answers")):
        bad.write_text("".join(json.dumps(edit(r)) + "\n" for r in rows))
        with pytest.raises(ShieldError, match=needle):
            Evaluator(EvalConfig(**{**cfg.__dict__, "reference_answers": str(bad), "out": str(tmp_path / "x")})).run()
    with pytest.raises(ShieldError, match="not found"):
        Evaluator(EvalConfig(**{**cfg.__dict__, "reference_answers": str(tmp_path / "nope.jsonl"),
                                "out": str(tmp_path / "x")})).run()
    assert not (tmp_path / "x").exists()


def test_ablation_zeroes_exactly_the_chosen_neurons(tiny_checkpoint):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from shield_ds.evaluate.ablation import ablate_neurons, random_like
    from shield_ds.models import get_adapter

    path = tiny_checkpoint("llava")
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    adapter = get_adapter(model.config)
    layers = adapter.decoder_layers(model)
    width = adapter.intermediate_size(model.config)
    chosen = torch.tensor([3, 17, 200])
    ns = NeuronSet({1: chosen}, {"num_layers": len(layers), "intermediate_size": width, "hidden_size": 64})
    seen: dict[int, torch.Tensor] = {}
    inputs = adapter.processor_inputs(processor, ["Hello there, how are you?"], None)

    def run() -> dict[int, torch.Tensor]:
        seen.clear()
        handles = [adapter.neuron_module(layer).register_forward_pre_hook(
            lambda _m, args, i=i: seen.__setitem__(i, args[0].detach().clone())) for i, layer in enumerate(layers)]
        with torch.no_grad():
            model(**inputs)
        for h in handles:
            h.remove()
        return dict(seen)

    plain = run()
    with ablate_neurons(model, adapter, ns):
        ablated = run()
    after = run()  # hooks removed: back to the plain model
    assert torch.equal(plain[0], ablated[0])
    others = torch.ones(width, dtype=torch.bool)
    others[chosen] = False
    assert torch.equal(ablated[1][..., others], plain[1][..., others])
    assert (ablated[1][..., chosen] == 0).all() and (plain[1][..., chosen] != 0).any()
    assert all(torch.equal(after[i], plain[i]) for i in plain)
    control = random_like(ns, seed=0)
    assert control.per_layer_counts() == ns.per_layer_counts() and control.as_pairs() != ns.as_pairs()


@timeout_above(300, 300, 300, 300)
def test_bad_input_one_line_errors(tiny_checkpoint, tmp_path):
    model = tiny_checkpoint("llava")
    judge, compare = tmp_path / "no-such-judge", tmp_path / "nothing"
    proc = run_python([EVALUATE, *_args(model, tmp_path / "out", "--judge", str(judge), "--ds-config", "none")],
                      check=False, timeout=300)
    assert_one_line_error(proc, f"judge model {judge}: no such directory")
    assert not (tmp_path / "out").exists()
    proc = run_python([EVALUATE, *_args(model, tmp_path / "out", "--compare", str(compare), "--ds-config", "none")],
                      check=False, timeout=300)
    assert_one_line_error(proc, f"{compare}: no asr.json to compare with")
    # a source whose prompts all fall in the train split has nothing to evaluate on the (default) test split
    from shield_ds.data.splits import split_of

    ids = [f"p{i}" for i in range(40) if split_of(f"tiny:p{i}", 0.3, 0) == "train"][:2]
    tiny = tmp_path / "tiny.jsonl"
    tiny.write_text("".join(json.dumps({"id": i, "prompt": f"How do I do harm number {i}?", "language": "en",
                                        "label": "harmful"}) + "\n" for i in ids))
    riddle = tmp_path / "riddle.jsonl"
    riddle.write_text(json.dumps({"prompt": "What has keys but no locks?", "language": "en", "form": "riddle"}) + "\n")
    for extra, needle in ((["--harmful", str(tiny)], "'en' prompt falls in the test split"),
                          (["--test-fraction", "1.5"], "--test-fraction"),
                          (["--benign-per-group-limit", "0"], "--benign-per-group-limit"),
                          (["--benign-mix", "multiq=-1,requests=1"], "--benign-mix 'multiq=-1'"),
                          (["--benign", str(riddle)], f"{riddle} line 1: unknown form 'riddle'")):
        proc = run_python([EVALUATE, *_args(model, tmp_path / "out", "--languages", "en", *extra, "--ds-config", "none")],
                          check=False, timeout=300)
        assert_one_line_error(proc, needle, *([str(tiny)] if extra[0] == "--harmful" else []))
    assert not (tmp_path / "out").exists()

