"""Stage 1: identification under ZeRO-3 equals one plain process, recovers planted neurons, refuses bad input."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, assert_one_line_error, child_env, run_deepspeed, run_python, timeout_above
from identify_helpers import MARKER, marker_datasets, plant_neurons, write_jsonl
from shield_ds.errors import ShieldError
from shield_ds.neurons import NeuronSet
from shield_ds.neurons.identify import IdentifyConfig, Identifier, format_summary

IDENTIFY = str(REPO / "recipes" / "identify.py")
FP32_PARTITIONED = ["--ds", "bf16.enabled=false", "--ds", "zero_optimization.stage3_param_persistence_threshold=0",
                    "--zero", "on"]


# The per-layer top 20% keeps 9 neurons of the tiny llava on this data; the cap leaves room for 5 of them
# (0.0034 x 309,952 parameters / 192 per neuron), so the layer-normalized cap ranking decides which.
CAP = 0.0034


def _common(model: Path, out: Path, *extra: str) -> list[str]:
    return ["--model", str(model), "--out", str(out), "--languages", "en,zh", "--modalities", "text,typographic",
            "--per-group-limit", "5", "--batch-size", "3", "--ratio", "0.2", "--max-param-fraction", str(CAP),
            *extra]


def _assert_same_result(a: Path, b: Path) -> None:
    sa, sb = load_file(str(a / "stats.safetensors")), load_file(str(b / "stats.safetensors"))
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=1e-9, atol=0.0, msg=key)
    na, nb = NeuronSet.load(a), NeuronSet.load(b)
    meta = na.meta
    assert meta["max_param_fraction"] == CAP and meta["cap_ranking"] == "layer-normalized"
    assert na.count == int(CAP * meta["total_params"] // meta["params_per_neuron"]) == 5  # the cap held
    for layer in range(na.num_layers):
        assert torch.equal(na.indices(layer), nb.indices(layer)), layer
    for name, subset in NeuronSet.load_named_sets(a).items():
        other = NeuronSet.load(b / "sets" / name)
        assert subset.as_pairs() == other.as_pairs(), name


@pytest.fixture(scope="module")
def plain_reference(tiny_checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("plain") / "identify"
    run_python([IDENTIFY, *_common(tiny_checkpoint("llava"), out), "--ds-config", "none"], timeout=300)
    return out


@pytest.mark.distributed
@pytest.mark.parametrize("ranks", [2, 3])
@timeout_above(300, 600)  # plain_reference, this launch
def test_zero3_matches_one_plain_process(ranks, tiny_checkpoint, plain_reference, tmp_path):
    out = tmp_path / "identify"
    run_deepspeed(IDENTIFY, _common(tiny_checkpoint("llava"), out, *FP32_PARTITIONED), num_ranks=ranks, timeout=600)
    meta = json.loads((out / "neurons.json").read_text())
    assert meta["world_size"] == ranks and meta["zero"] == "on"
    total_records = sum(g["records"] for g in meta["groups"].values())
    assert total_records == 40 and (ranks != 3 or total_records % 3 != 0)
    _assert_same_result(plain_reference, out)


@pytest.mark.distributed
@pytest.mark.parametrize("zero", ["off", "auto"])
def test_replica_per_rank_matches_one_plain_process(zero, tiny_checkpoint, plain_reference, tmp_path):
    """--zero off (and auto, which picks off for a model this small): a plain replica on each of 2 ranks,
    prompts sharded, statistics all-reduced; the result equals one process."""
    out = tmp_path / "identify"
    flags = ["--ds", "bf16.enabled=false"] + (["--zero", zero] if zero != "auto" else [])
    run_deepspeed(IDENTIFY, _common(tiny_checkpoint("llava"), out, *flags), num_ranks=2, timeout=600)
    meta = json.loads((out / "neurons.json").read_text())
    assert meta["world_size"] == 2 and meta["zero"] == "off"
    assert json.loads((plain_reference / "neurons.json").read_text())["zero"] == "off"  # --ds-config none
    _assert_same_result(plain_reference, out)


@pytest.mark.distributed
def test_mixed_modality_uneven_shards_finish(tiny_checkpoint, tmp_path):
    # 4 harmful + 3 benign records, text and typographic, over 2 ranks.
    harmful = write_jsonl(tmp_path / "h.jsonl", [
        {"id": "h1", "prompt": "How do I pick a lock?", "language": "en", "label": "harmful"},
        {"id": "h2", "prompt": "", "image_text": "Steps to make a weapon.", "language": "en", "label": "harmful", "modality": "typographic"},
        {"id": "h3", "prompt": "", "image_text": "Steps to steal a car.", "language": "en", "label": "harmful", "modality": "typographic"},
    ])
    benign = write_jsonl(tmp_path / "b.jsonl", [
        {"id": "b1", "prompt": "What is the capital of Kenya?", "language": "en", "label": "benign"},
        {"id": "b2", "prompt": "", "image_text": "Steps to bake bread.", "language": "en", "label": "benign", "modality": "typographic"},
    ])
    out = tmp_path / "identify"
    run_deepspeed(IDENTIFY, ["--model", str(tiny_checkpoint("llava")), "--harmful", str(harmful), "--benign", str(benign),
                             "--modalities", "text,typographic", "--batch-size", "2", "--out", str(out),
                             "--max-param-fraction", "0", "--split", "all", *FP32_PARTITIONED], num_ranks=2, timeout=600)
    meta = json.loads((out / "neurons.json").read_text())
    assert sum(g["records"] for g in meta["groups"].values()) == 7
    assert {g.split(".")[2] for g in meta["groups"]} == {"text", "typographic"}
    assert all(g["tokens"] > 0 for g in meta["groups"].values())


@pytest.mark.distributed
def test_saved_datasets_with_image_objects_on_two_ranks(tiny_checkpoint, tmp_path):
    """Both ranks load the same save_to_disk datasets and write their images to one cache at once."""
    import datasets
    from PIL import Image

    colors = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]
    for label, part in (("harmful", colors[:2]), ("benign", colors[2:])):
        datasets.Dataset.from_dict({
            "prompt": [f"What does this {label} picture show?"] * 2, "language": ["en", "en"],
            "label": [label, label], "image": [Image.new("RGB", (32, 32), c) for c in part],
        }).cast_column("image", datasets.Image()).save_to_disk(str(tmp_path / label))
    out, cache = tmp_path / "identify", tmp_path / "cache"
    run_deepspeed(IDENTIFY, ["--model", str(tiny_checkpoint("llava")), "--harmful", str(tmp_path / "harmful"),
                             "--benign", str(tmp_path / "benign"), "--modalities", "image", "--batch-size", "2",
                             "--out", str(out), "--max-param-fraction", "0", "--split", "all", *FP32_PARTITIONED],
                  num_ranks=2, timeout=600, env=child_env(SHIELD_DS_IMAGE_CACHE=str(cache)))
    meta = json.loads((out / "neurons.json").read_text())
    assert {g: v["records"] for g, v in meta["groups"].items()} == {"harmful.en.image": 2, "benign.en.image": 2}
    assert len([p for p in cache.iterdir() if p.suffix == ".png"]) == 4
    assert not [p for p in cache.iterdir() if p.suffix != ".png"]  # no temporary files left


@pytest.fixture(scope="module")
def planted(tiny_checkpoint, shared_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("planted")
    src = tiny_checkpoint("llava")
    width = json.loads((src / "config.json").read_text())["text_config"]["intermediate_size"]
    layers = json.loads((src / "config.json").read_text())["text_config"]["num_hidden_layers"]
    gen = torch.Generator().manual_seed(7)
    per_layer = round(0.02 * width)
    truth = {layer: sorted(torch.randperm(width, generator=gen)[:per_layer].tolist()) for layer in range(layers)}
    plant_neurons(src, tmp / "model", truth)
    with open(shared_data / "multiq_benign.csv", encoding="utf-8") as f:
        prompts = [row["prompt"] for row in csv.DictReader(f) if row["language"] == "en"][:24]
    assert not any(MARKER in p for p in prompts)
    harmful, benign = marker_datasets(tmp, prompts)
    return tmp / "model", harmful, benign, truth


@pytest.mark.parametrize("score", ["saliency", "contrast", "frequency"])
def test_planted_neurons_are_recovered(planted, score, tmp_path):
    model, harmful, benign, truth = planted
    cfg = IdentifyConfig(model=str(model), harmful=[str(harmful)], benign=[str(benign)], modalities=["text"],
                         score=score, ratio=0.02, max_param_fraction=0.0, batch_size=8, out=str(tmp_path / "out"),
                         ds_config=None, split="all")
    found = Identifier(cfg).run().as_pairs()
    true = {(layer, i) for layer, idx in truth.items() for i in idx}
    precision = len(found & true) / max(len(found), 1)
    recall = len(found & true) / len(true)
    assert precision >= 0.95 and recall >= 0.95, (score, precision, recall)


def test_cap_ranking_layer_normalized_keeps_every_layer(tiny_checkpoint, shared_data, tmp_path):
    """Planted neurons whose saliency grows 10x per layer: the raw cap keeps only the deep layers."""
    src = tiny_checkpoint("llava")
    text = json.loads((src / "config.json").read_text())["text_config"]
    layers, width = text["num_hidden_layers"], text["intermediate_size"]
    per_layer = round(0.02 * width)
    truth = {layer: list(range(7 * layer + 3, 7 * layer + 3 + per_layer)) for layer in range(layers)}
    plant_neurons(src, tmp_path / "model", truth, down_scale={layer: 10.0 ** layer for layer in range(layers)})
    with open(shared_data / "multiq_benign.csv", encoding="utf-8") as f:
        prompts = [row["prompt"] for row in csv.DictReader(f) if row["language"] == "en"][:8]
    harmful, benign = marker_datasets(tmp_path, prompts)
    budget = 2 * layers  # neurons: fewer than the per-layer selection's layers x per_layer
    kept = {}
    for ranking in ("layer-normalized", "raw"):
        cfg = IdentifyConfig(model=str(tmp_path / "model"), harmful=[str(harmful)], benign=[str(benign)],
                             modalities=["text"], ratio=0.02, max_param_fraction=0.0, batch_size=8,
                             out=str(tmp_path / ranking), ds_config=None, cap_ranking=ranking)
        per_neuron = 3 * text["hidden_size"]
        total = Identifier(cfg).run().meta["total_params"]  # uncapped: every planted neuron is a candidate
        cfg.max_param_fraction = (budget * per_neuron + 0.5) / total
        cfg.out, cfg.overwrite = str(tmp_path / f"{ranking}-capped"), True
        kept[ranking] = Identifier(cfg).run()
        assert kept[ranking].count == budget and kept[ranking].meta["cap_ranking"] == ranking
    normalized, raw = kept["layer-normalized"].per_layer_counts(), kept["raw"].per_layer_counts()
    assert normalized == [2] * layers, normalized  # every layer keeps its two best planted neurons
    assert raw[0] == raw[1] == 0 and raw[-1] == per_layer, raw  # raw scores pile into the deepest layers
    assert kept["layer-normalized"].as_pairs() <= {(layer, i) for layer, idx in truth.items() for i in idx}
    assert "ranked layer-normalized" in format_summary(kept["layer-normalized"])
    assert f"in {layers} of {layers} layers" in format_summary(kept["layer-normalized"])


def test_param_fraction_counts_real_parameters_and_cap_holds(tiny_checkpoint, tmp_path):
    from transformers import AutoModelForImageTextToText

    model_dir = tiny_checkpoint("llava")
    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    total = sum(p.numel() for p in model.parameters())
    for cap in (0.0, 0.004):
        cfg = IdentifyConfig(model=str(model_dir), languages=["en", "ar"], modalities=["text"], per_group_limit=6,
                             ratio=0.05, max_param_fraction=cap, out=str(tmp_path / f"cap{cap}"), ds_config=None)
        ns = Identifier(cfg).run()
        # Count the parameters the selected neurons really own: gate row + up row + down column.
        owned = 0
        layers = model.model.language_model.layers
        for layer, idx in ns.layers.items():
            mlp = layers[layer].mlp
            owned += sum(mlp.gate_proj.weight[i].numel() + mlp.up_proj.weight[i].numel()
                         + mlp.down_proj.weight[:, i].numel() for i in idx.tolist())
        assert ns.meta["total_params"] == total
        assert ns.param_fraction == pytest.approx(owned / total, rel=1e-12)
        if cap:
            assert ns.param_fraction <= cap
            assert ns.count == int(cap * total // ns.meta["params_per_neuron"])
        else:
            assert ns.param_fraction > 0.004


@timeout_above(300, 300, 300)
def test_bad_input_errors_and_nothing_written(tiny_checkpoint, tmp_path):
    model = str(tiny_checkpoint("llava"))
    empty = write_jsonl(tmp_path / "empty.jsonl", [])
    out = tmp_path / "out1"
    proc = run_python([IDENTIFY, "--model", model, "--harmful", str(empty), "--out", str(out), "--ds-config", "none"],
                      check=False, timeout=300)
    assert_one_line_error(proc, "empty")
    assert not out.exists()

    proc = run_python([IDENTIFY, "--model", model, "--languages", "en,de", "--out", str(out), "--ds-config", "none"],
                      check=False, timeout=300)
    assert_one_line_error(proc, "de")
    assert not out.exists()

    # SafeBench as text is an evaluation-only source: identify (like train) refuses it
    proc = run_python([IDENTIFY, "--model", model, "--harmful", "multijail", "safebench-text", "--out", str(out),
                       "--ds-config", "none"], check=False, timeout=300)
    assert_one_line_error(proc, "safebench-text: an evaluation-only source")
    assert not out.exists()

    # An output directory written for another model is refused, and left as it was.
    other = tmp_path / "other"
    other.mkdir()
    (other / "neurons.json").write_text(json.dumps({"config_hash": "0" * 64}))
    before = sorted(p.name for p in other.iterdir())
    proc = run_python([IDENTIFY, "--model", model, "--out", str(other), "--ds-config", "none", "--per-group-limit", "2"],
                      check=False, timeout=300)
    assert_one_line_error(proc, str(other), "another model")
    assert sorted(p.name for p in other.iterdir()) == before
    assert json.loads((other / "neurons.json").read_text()) == {"config_hash": "0" * 64}


def test_output_older_than_a_signature_key_counts_as_its_default():
    """An identify output written before --benign-per-group-limit / --validation-fraction existed is reused
    by a run at their defaults, and refused by one that sets them."""
    from shield_ds.config import LATER_DATA_OPTIONS
    from shield_ds.neurons.identify import Identifier, IdentifyConfig, signature_differences

    signature = Identifier(IdentifyConfig(model="m")).signature("h")
    older = {k: v for k, v in signature.items() if k not in LATER_DATA_OPTIONS}
    assert set(LATER_DATA_OPTIONS) <= set(signature) and signature_differences(older, signature) == []
    assert signature_differences(older, {**signature, "validation_fraction": 0.2}) == ["validation_fraction"]
    assert signature_differences(older, {**signature, "benign_per_group_limit": 9}) == ["benign_per_group_limit"]


@pytest.mark.distributed
@timeout_above(900)
def test_every_family_identifies_end_to_end(tiny_checkpoint, tmp_path):
    from shield_ds.models.tiny import TINY_FAMILIES

    models = [str(tiny_checkpoint(arch)) for arch in TINY_FAMILIES]
    run_deepspeed(REPO / "tests" / "workers" / "identify_families.py", [str(tmp_path), *models], num_ranks=2,
                  timeout=900)
    from shield_ds.models import get_adapter, load_config

    for arch, model in zip(TINY_FAMILIES, models):
        out = tmp_path / Path(model).name
        ns = NeuronSet.load(out)
        assert ns.meta["model_type"] == arch and ns.meta["world_size"] == 2
        assert len(ns.per_layer_counts()) == ns.num_layers
        groups = ns.meta["groups"]
        adapter = get_adapter(load_config(model))
        assert {g.split(".")[2] for g in groups} == ({"text", "typographic"} if adapter.supports_images else {"text"})
        stats = load_file(str(out / "stats.safetensors"))
        skipped = set(adapter.text_only_skipped_layers(load_config(model)))
        for group in groups:
            counts = stats[f"{group}.count"][:, 0]
            for layer in range(ns.num_layers):
                # text-only batches never run mllama's cross-attention layers; every other layer saw tokens
                expected = group.endswith(".text") and layer in skipped
                assert (counts[layer] == 0) == expected, (arch, group, layer, counts.tolist())
            assert stats[f"{group}.abssum"].sum() > 0
        if not adapter.supports_images:
            assert not (out / "vision").exists()
            continue
        vision = load_file(str(out / "vision" / "stats.safetensors"))
        for group in groups:  # the vision tower ran (on every rank's shard) exactly for the image groups
            seen = vision[f"{group}.count"][:, 0]
            assert ((seen > 0).all() if group.endswith(".typographic") else (seen == 0).all()), (arch, group)


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl"])
def test_scope_lm_plus_vision_writes_a_vision_set(arch, tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    cfg = IdentifyConfig(model=str(tiny_checkpoint(arch)), languages=["en"], modalities=["text", "typographic"],
                         per_group_limit=4, batch_size=2, ratio=0.1, max_param_fraction=0.0, out=str(out),
                         ds_config=None, scope="lm+vision")
    Identifier(cfg).run()
    vision = NeuronSet.load(out / "vision")
    assert vision.meta["scope"] == "vision" and vision.num_layers == len(vision.meta["modules"]) >= 2
    assert len(vision.per_layer_counts()) == vision.num_layers
    assert set(vision.meta["harmful_groups"]) == {"harmful.en.typographic"}
    stats = load_file(str(out / "vision" / "stats.safetensors"))
    for group in ("harmful.en.typographic", "benign.en.typographic"):
        assert (stats[f"{group}.count"] > 0).all()  # every vision layer saw the images' rows
    for group in ("harmful.en.text", "benign.en.text"):
        assert (stats[f"{group}.count"] == 0).all()  # text-only prompts never reach the vision tower
    assert NeuronSet.load(out).meta["scope"] == "lm+vision"


def test_from_stats_selects_what_a_full_run_would(tiny_checkpoint, tmp_path):
    """Re-selection from saved statistics (other score, ratio, cap) equals identify run afresh with those
    settings, named sets included; anything that changes the statistics themselves is refused."""
    model = str(tiny_checkpoint("llava"))
    data = dict(model=model, languages=["en", "zh"], modalities=["text", "typographic"], per_group_limit=4,
                batch_size=4, ds_config=None)
    source = tmp_path / "source"
    Identifier(IdentifyConfig(**data, ratio=0.2, max_param_fraction=CAP, out=str(source))).run()
    for selection in ({"score": "contrast", "ratio": 0.1, "max_param_fraction": 0.0},
                      {"ratio": 0.3, "max_param_fraction": 0.002, "cap_ranking": "raw"}):
        name = "-".join(f"{v}" for v in selection.values())
        fresh = Identifier(IdentifyConfig(**data, **selection, out=str(tmp_path / f"fresh{name}"))).run()
        again = Identifier(IdentifyConfig(**data, **selection, out=str(tmp_path / f"again{name}"),
                                          from_stats=str(source))).run()
        assert again.as_pairs() == fresh.as_pairs() and again.count > 0, selection
        reloaded = NeuronSet.load(tmp_path / f"again{name}")
        assert reloaded.meta["selected_from"] == str(source) and reloaded.meta["ratio"] == selection["ratio"]
        for set_name, subset in NeuronSet.load_named_sets(tmp_path / f"fresh{name}").items():
            assert NeuronSet.load(tmp_path / f"again{name}" / "sets" / set_name).as_pairs() == subset.as_pairs()
    # a re-selection's output can be selected from again (its stats file carries the norms too)
    chained = Identifier(IdentifyConfig(**data, ratio=0.2, max_param_fraction=CAP, out=str(tmp_path / "chained"),
                                        from_stats=str(tmp_path / "again0.3-0.002-raw"))).run()
    assert chained.as_pairs() == NeuronSet.load(source).as_pairs()

    def refused(match: str, **changes) -> None:
        out = tmp_path / "refused"
        cfg = IdentifyConfig(**{**data, "ratio": 0.2, "out": str(out), "from_stats": str(source), **changes})
        with pytest.raises(ShieldError, match=match) as exc:
            Identifier(cfg).run()
        assert "\n" not in str(exc.value) and not out.exists()

    refused("other per_group_limit .per_group_limit=4 there, 5 here", per_group_limit=5)
    refused("other languages, tokens|other tokens", tokens="last", languages=["en"])
    refused("--out must be another directory", out=str(source))
    refused(f"{tmp_path / 'nowhere'}: not found|no stats.safetensors", from_stats=str(tmp_path / "nowhere"))


def test_from_stats_command_line(plain_reference, tiny_checkpoint, tmp_path):
    """Through the recipe: a re-selection in one process (no launcher, no forward), then bad input."""
    model = tiny_checkpoint("llava")
    out = tmp_path / "wider"
    proc = run_python([IDENTIFY, *_common(model, out, "--from-stats", str(plain_reference), "--ds-config", "none"),
                       "--max-param-fraction", "0"], timeout=300)
    assert "safety neurons (saliency score, ratio 0.2" in proc.stdout
    wider, source = NeuronSet.load(out), NeuronSet.load(plain_reference)
    assert source.as_pairs() < wider.as_pairs()  # the cap removed: the per-layer top 20% the source cut from
    assert (out / "stats.safetensors").read_bytes() == (plain_reference / "stats.safetensors").read_bytes()
    proc = run_python([IDENTIFY, *_common(model, tmp_path / "bad", "--from-stats", str(plain_reference)),
                       "--per-group-limit", "2"], timeout=300, check=False)
    assert_one_line_error(proc, str(plain_reference), "per_group_limit")
    assert not (tmp_path / "bad").exists()
