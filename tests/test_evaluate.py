"""Stage 3 recipe: lockstep generation under ZeRO-3, the ablation hook, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import REPO, run_deepspeed, run_python
from shield_ds.neurons import NeuronSet

EVALUATE = str(REPO / "recipes" / "evaluate.py")


def _args(model: Path, out: Path, *extra: str) -> list[str]:
    # 2 languages x 2 modalities x 2 labels x 3 per group = 24 records, 12 batches of 2 (uneven over ranks per kind? see plan)
    return ["--model", str(model), "--out", str(out), "--languages", "en,ar", "--modalities", "text,typographic",
            "--per-group-limit", "3", "--batch-size", "2", "--max-new-tokens", "12", *extra]


def _responses(out: Path) -> dict[str, str]:
    rows = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    return {r["id"]: r["response"] for r in rows}


@pytest.mark.distributed
def test_zero3_two_ranks_generate_like_one_process(tiny_checkpoint, tmp_path):
    model = tiny_checkpoint("llava")
    run_python([EVALUATE, *_args(model, tmp_path / "one", "--ds-config", "none")], timeout=300)
    run_deepspeed(EVALUATE, _args(model, tmp_path / "two", "--ds", "bf16.enabled=false",
                                  "--ds", "zero_optimization.stage3_param_persistence_threshold=0"),
                  num_ranks=2, timeout=600)
    one, two = _responses(tmp_path / "one"), _responses(tmp_path / "two")
    assert len(one) == 24 and one == two
    table = json.loads((tmp_path / "two" / "asr.json").read_text())
    assert set(table["languages"]) == {"en", "ar"}
    assert (tmp_path / "two" / "asr_heatmap.png").stat().st_size > 1000


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


def test_bad_input_one_line_errors(tiny_checkpoint, tmp_path):
    model = tiny_checkpoint("llava")
    proc = run_python([EVALUATE, *_args(model, tmp_path / "out", "--judge", str(tmp_path / "no-such-judge"),
                                        "--ds-config", "none")], check=False, timeout=300)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "no-such-judge" in last
    assert not (tmp_path / "out").exists()
    proc = run_python([EVALUATE, *_args(model, tmp_path / "out", "--compare", str(tmp_path / "nothing"),
                                        "--ds-config", "none")], check=False, timeout=300)
    assert proc.returncode == 2 and "nothing" in proc.stderr.strip().splitlines()[-1]
    # a source whose prompts all fall in the train split has nothing to evaluate on the (default) test split
    from shield_ds.data.splits import split_of

    ids = [f"p{i}" for i in range(40) if split_of(f"tiny:p{i}", 0.3, 0) == "train"][:2]
    tiny = tmp_path / "tiny.jsonl"
    tiny.write_text("".join(json.dumps({"id": i, "prompt": f"How do I do harm number {i}?", "language": "en",
                                        "label": "harmful"}) + "\n" for i in ids))
    for extra, needle in ((["--harmful", str(tiny)], "'en' prompt falls in the test split"),
                          (["--test-fraction", "1.5"], "--test-fraction")):
        proc = run_python([EVALUATE, *_args(model, tmp_path / "out", "--languages", "en", *extra, "--ds-config", "none")],
                          check=False, timeout=300)
        last = proc.stderr.strip().splitlines()[-1]
        assert proc.returncode == 2 and last.startswith("error: ") and needle in last, last
        assert extra[0] != "--harmful" or str(tiny) in last
    assert not (tmp_path / "out").exists()

