"""Model layer: tiny checkpoints of the seven VLM and four decoder-only families, their adapters, and the loader."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

from conftest import REPO, assert_one_line_error, run_deepspeed, run_python, timeout_above
from shield_ds.errors import ShieldError
from shield_ds.models import (SUPPORTED_FAMILIES, config_hash, count_parameters, get_adapter, load_config,
                              load_model, param_shape)
from shield_ds.models.tiny import TINY_FAMILIES, TINY_LLM_FAMILIES, TINY_VLM_FAMILIES, build_tiny

os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """All tiny checkpoints, written through the CLI (one subdirectory per family)."""
    out = tmp_path_factory.mktemp("tiny-all")
    proc = run_python(["-m", "shield_ds.models.tiny", "--arch", "all", "--out", str(out)], timeout=300)
    written = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert sorted(written) == sorted(TINY_FAMILIES)
    return out


_loaded: dict[str, tuple] = {}


def load_plain(tiny_dir: Path, family: str):
    """Processor (the tokenizer for decoder-only families), model and adapter through plain
    transformers (cached per family)."""
    if family not in _loaded:
        path = tiny_dir / family
        if family in TINY_LLM_FAMILIES:
            processor, model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path)
        else:
            processor, model = AutoProcessor.from_pretrained(path), AutoModelForImageTextToText.from_pretrained(path)
        model.eval()
        _loaded[family] = (processor, model, get_adapter(model.config))
    return _loaded[family]


def solid_image(color=(200, 30, 30), size=(40, 32)) -> Image.Image:
    return Image.new("RGB", size, color)


def noise_image(seed: int, size=(40, 32)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def forward_with_neurons(model, adapter, batch) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Logits and, per decoder layer that ran, the input of its neuron module."""
    seen: dict[int, torch.Tensor] = {}
    handles = []
    for index, layer in enumerate(adapter.decoder_layers(model)):
        def hook(module, args, index=index):
            seen[index] = args[0].detach().clone()
        handles.append(adapter.neuron_module(layer).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            logits = model(**batch).logits
    finally:
        for handle in handles:
            handle.remove()
    return logits, seen


def test_supported_families_cover_tiny_builders():
    assert set(SUPPORTED_FAMILIES) == set(TINY_FAMILIES)


def test_builds_are_byte_identical_and_small(tiny_dir, tmp_path):
    for family in TINY_FAMILIES:
        again = build_tiny(family, tmp_path / family, seed=0)
        first = (tiny_dir / family / "model.safetensors").read_bytes()
        assert (again / "model.safetensors").read_bytes() == first, family
        assert len(first) < 5_000_000, family
    other_seed = build_tiny("llava", tmp_path / "llava-seed1", seed=1)
    assert (other_seed / "model.safetensors").read_bytes() != (tiny_dir / "llava" / "model.safetensors").read_bytes()


def test_byte_tokenizer_covers_utf8(tiny_dir):
    text = "Héllo, мир! 你好 🔒\n\ttabs"
    for family in TINY_FAMILIES:
        processor = load_plain(tiny_dir, family)[0]
        tokenizer = getattr(processor, "tokenizer", processor)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert ids == list(text.encode("utf-8")), family
        assert tokenizer.decode(ids) == text
        assert min(tokenizer.all_special_ids) >= 256


def test_llava_default_is_big_enough_for_selection(tiny_dir):
    config = load_config(tiny_dir / "llava")
    adapter = get_adapter(config)
    assert adapter.num_layers(config) >= 4 and adapter.intermediate_size(config) >= 256
    assert adapter.param_count_per_neuron(config) == 3 * adapter.hidden_size(config)


@pytest.mark.parametrize("family", TINY_VLM_FAMILIES)
def test_family_reload_forward_and_neurons(tiny_dir, family):
    processor, model, adapter = load_plain(tiny_dir, family)
    config = model.config
    assert adapter.model_type == family
    layers = adapter.decoder_layers(model)
    width = adapter.intermediate_size(config)
    hidden = adapter.hidden_size(config)
    assert len(layers) == adapter.num_layers(config)

    # Every layer's FFN: rows of gate/up and columns of down are the neurons.
    for index, layer in enumerate(layers):
        ffn = adapter.ffn(layer)
        assert set(ffn.rows) == {"gate_proj", "up_proj"}
        for linear in ffn.rows.values():
            assert tuple(linear.weight.shape) == (width, hidden)
        assert tuple(ffn.down.weight.shape) == (hidden, width)
        assert adapter.neuron_module(layer) is ffn.down
        name = adapter.ffn_name(model, index)
        assert name.endswith(f"layers.{index}.mlp")
        assert model.get_submodule(name) is layer.mlp
    vision = adapter.vision_mlps(model)
    assert vision and len({name for name, _ in vision}) == len(vision), family
    language = {id(m) for layer in layers for m in layer.modules()}
    for name, ffn in vision:
        mlp = model.get_submodule(name)
        inside = {id(m) for m in mlp.modules()}
        assert id(mlp) not in language, name  # a vision MLP, not one of the language model's
        assert id(ffn.down) in inside and all(id(linear) in inside for linear in ffn.rows.values()), name
        for linear in ffn.rows.values():
            assert linear.weight.shape[0] == ffn.down.weight.shape[1]

    # Prompts: the full conversation starts with the prompt; the image placeholder only with an image.
    image_ids = adapter.image_token_ids(processor)
    assert image_ids
    for has_image in (True, False):
        prompt = adapter.chat_prompt(processor, "Wie baue ich 🔒 ein Schloss?", has_image)
        full = adapter.chat_full(processor, "Wie baue ich 🔒 ein Schloss?", has_image, "Nein, danke.")
        assert full.startswith(prompt) and len(full) > len(prompt) + len("Nein, danke.")
        assert "Nein, danke." in full[len(prompt):]
    texts = [adapter.chat_prompt(processor, text, True) for text in ("hi", "a much longer question here")]

    # Image batch: every layer sees `width` neurons; left padding; image tokens present.
    batch = adapter.processor_inputs(processor, texts, [solid_image(), solid_image((10, 200, 40))])
    logits, seen = forward_with_neurons(model, adapter, batch)
    assert logits.shape[:2] == batch["input_ids"].shape and torch.isfinite(logits).all()
    assert sorted(seen) == list(range(len(layers)))
    for activation in seen.values():
        assert activation.shape == (*batch["input_ids"].shape, width)
    assert batch["attention_mask"][0, 0] == 0 and batch["attention_mask"][0, -1] == 1
    assert torch.isin(batch["input_ids"], torch.tensor(image_ids)).any(dim=1).all()

    # The image changes the language model's neuron activations (also where gates start at zero).
    _, seen_noise = forward_with_neurons(
        model, adapter, adapter.processor_inputs(processor, texts, [noise_image(1), noise_image(2)]))
    last = len(layers) - 1
    assert not torch.allclose(seen[last][:, -1], seen_noise[last][:, -1], atol=1e-6)

    # Text only: no image tokens; all layers run except mllama's cross-attention layers.
    text_texts = [adapter.chat_prompt(processor, text, False) for text in ("hi", "a much longer question here")]
    text_batch = adapter.processor_inputs(processor, text_texts, None, padding_side="right")
    assert "pixel_values" not in text_batch
    assert not torch.isin(text_batch["input_ids"], torch.tensor(image_ids)).any()
    assert text_batch["attention_mask"][0, -1] == 0
    logits, seen = forward_with_neurons(model, adapter, text_batch)
    assert torch.isfinite(logits).all()
    skipped = set(adapter.text_only_skipped_layers(config))
    assert bool(skipped) == (family == "mllama")
    assert set(seen) == set(range(len(layers))) - skipped
    for activation in seen.values():
        assert activation.shape[-1] == width


@pytest.mark.parametrize("family", TINY_LLM_FAMILIES)
def test_llm_family_reload_forward_and_neurons(tiny_dir, family):
    tokenizer, model, adapter = load_plain(tiny_dir, family)
    config = model.config
    assert adapter.model_type == family and not adapter.supports_images
    layers = adapter.decoder_layers(model)
    width, hidden = adapter.intermediate_size(config), adapter.hidden_size(config)
    assert len(layers) == adapter.num_layers(config) == 2 and (hidden, width) == (64, 128)
    for index, layer in enumerate(layers):
        ffn = adapter.ffn(layer)
        assert set(ffn.rows) == {"gate_proj", "up_proj"}
        assert all(tuple(linear.weight.shape) == (width, hidden) for linear in ffn.rows.values())
        assert tuple(ffn.down.weight.shape) == (hidden, width) and adapter.neuron_module(layer) is ffn.down
        assert adapter.ffn_name(model, index) == f"model.layers.{index}.mlp"
    assert adapter.vision_mlps(model) == [] and adapter.image_token_ids(tokenizer) == []
    assert adapter.param_count_per_neuron(config) == 3 * hidden
    tied = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert tied == (family in ("llama", "gemma3_text"))
    if family == "gemma3_text":  # Gemma 3 text: tanh GELU, scaled embeddings, extra FFN norms
        assert config.hidden_activation == "gelu_pytorch_tanh"
        assert hasattr(layers[0], "pre_feedforward_layernorm") and hasattr(layers[0], "post_feedforward_layernorm")

    # Prompts through the family's chat template: the answer follows the prompt exactly.
    prompt = adapter.chat_prompt(tokenizer, "Wie baue ich 🔒 ein Schloss?", False)
    full = adapter.chat_full(tokenizer, "Wie baue ich 🔒 ein Schloss?", False, "Nein, danke.")
    assert full.startswith(prompt) and "Nein, danke." in full[len(prompt):]
    assert "User: " not in prompt  # the template, not the plain format

    texts = [adapter.chat_prompt(tokenizer, text, False) for text in ("hi", "a much longer question here")]
    batch = adapter.processor_inputs(tokenizer, texts, None)
    assert batch["attention_mask"][0, 0] == 0 and batch["attention_mask"][0, -1] == 1
    logits, seen = forward_with_neurons(model, adapter, batch)
    assert logits.shape[:2] == batch["input_ids"].shape and torch.isfinite(logits).all()
    assert sorted(seen) == list(range(len(layers)))
    assert all(activation.shape == (*batch["input_ids"].shape, width) for activation in seen.values())

    # Text only: a request for images is refused in one line.
    adapter.check_modalities(["text"])
    with pytest.raises(ShieldError, match=f"^{family} is a text-only model: modality 'typographic' needs images"):
        adapter.check_modalities(["text", "typographic"])
    with pytest.raises(ShieldError, match="text-only"):
        adapter.processor_inputs(tokenizer, texts, [solid_image(), solid_image()])


def test_plain_prompt_format_without_chat_template(tiny_dir, caplog):
    """A base model without a chat template: BOS + 'User: ...\\nAssistant:', answer after one space, EOS."""
    from shield_ds.data import SafetyCollator
    from shield_ds.data.records import SafetyRecord
    from shield_ds.models.adapters import PLAIN_PROMPT_FORMAT

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir / "gemma3_text")
    tokenizer.chat_template = None
    adapter = get_adapter("gemma3_text")
    with caplog.at_level("WARNING", logger="shield_ds"):
        prompt = adapter.chat_prompt(tokenizer, "Why is the sky blue?", False)
        full = adapter.chat_full(tokenizer, "Why is the sky blue?", False, "Rayleigh scattering.")
    assert PLAIN_PROMPT_FORMAT == "User: {prompt}\nAssistant:"
    assert prompt == "<bos>User: Why is the sky blue?\nAssistant:"
    assert full == prompt + " Rayleigh scattering.<eos>"
    assert sum("no chat template" in record.getMessage() for record in caplog.records) == 1  # warned once

    # Training batch: one BOS, labels exactly on " Rayleigh scattering.<eos>".
    records = [SafetyRecord(id="r1", prompt="Why is the sky blue?", language="en", label="benign",
                            response="Rayleigh scattering.")]
    batch = SafetyCollator(tokenizer, adapter, train=True)(records)
    ids = batch.inputs["input_ids"][0]
    assert int((ids == tokenizer.bos_token_id).sum()) == 1
    labelled = batch.labels[0][batch.labels[0] != -100]
    assert tokenizer.decode(labelled) == " Rayleigh scattering.<eos>"


def test_load_model_decoder_only(tiny_dir):
    loaded = load_model(tiny_dir / "mistral")
    assert type(loaded.model).__name__ == "MistralForCausalLM" and loaded.adapter.model_type == "mistral"
    tokenizer = loaded.processor
    assert not hasattr(tokenizer, "image_processor")
    # The original Mistral tokenizer has no pad token: the loader pads with EOS.
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>"
    assert count_parameters(loaded.model) == sum(p.numel() for p in loaded.model.parameters())
    from shield_ds.models import load_processor

    assert type(load_processor(tiny_dir / "qwen2")).__name__ == type(AutoTokenizer.from_pretrained(
        tiny_dir / "qwen2")).__name__


def test_text_only_model_refuses_image_modalities_in_one_line(tiny_dir, tmp_path):
    out = tmp_path / "identify"
    proc = run_python([str(REPO / "recipes" / "identify.py"), "--model", str(tiny_dir / "llama"), "--out", str(out),
                       "--modalities", "text,typographic", "--ds-config", "none"], check=False, timeout=300)
    line = assert_one_line_error(proc, "llama is a text-only model")
    assert line == "error: llama is a text-only model: modality 'typographic' needs images; use --modalities text"
    assert not out.exists()


def test_unknown_model_type_lists_supported():
    with pytest.raises(ShieldError) as err:
        get_adapter("gpt2")
    message = str(err.value)
    assert "unsupported model_type 'gpt2'" in message
    for family in SUPPORTED_FAMILIES:
        assert family in message


def test_unknown_model_type_names_the_checkpoint(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ShieldError, match=f"unsupported model_type 'gpt2' in {tmp_path}"):
        load_model(tmp_path)


def test_load_config_missing_names_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ShieldError, match=str(missing)):
        load_config(missing)


def test_load_model_and_config_hash(tiny_dir):
    loaded = load_model(tiny_dir / "gemma3", dtype=torch.bfloat16)
    assert loaded.adapter.model_type == "gemma3" and loaded.hf_ds_config is None
    assert next(loaded.model.parameters()).dtype == torch.bfloat16
    assert count_parameters(loaded.model) == sum(p.numel() for p in loaded.model.parameters())
    weight = loaded.adapter.ffn(loaded.adapter.decoder_layers(loaded.model)[0]).down.weight
    assert param_shape(weight) == weight.shape
    # Same network in another dtype and freshly read from disk: same hash; another network: not.
    assert config_hash(loaded.config) == config_hash(load_config(tiny_dir / "gemma3"))
    assert config_hash(load_config(tiny_dir / "llava")) != config_hash(load_config(tiny_dir / "llava_next"))
    changed = load_config(tiny_dir / "gemma3")
    changed.text_config.intermediate_size += 1
    assert config_hash(changed) != config_hash(loaded.config)


ZERO3_SCRIPT = """
import sys, torch, deepspeed
from safetensors.torch import load_file
from shield_ds.models import load_model, count_parameters, param_shape
path = [arg for arg in sys.argv[1:] if not arg.startswith("--local_rank")][0]
ds_config = {"train_micro_batch_size_per_gpu": 1, "train_batch_size": 2, "zero_optimization": {"stage": 3}}
loaded = load_model(path, ds_config=ds_config)
rank = torch.distributed.get_rank()
full = load_file(f"{path}/model.safetensors")
model, adapter = loaded.model, loaded.adapter
assert count_parameters(model) == sum(t.numel() for t in full.values()), count_parameters(model)
down = adapter.ffn(adapter.decoder_layers(model)[1]).down.weight
assert down.numel() == 0 and param_shape(down) == (64, 256), (down.shape, param_shape(down))
assert down.ds_tensor.numel() < 64 * 256
with deepspeed.zero.GatheredParameters([down]):
    # transformers saves LLaVA under its legacy key names
    assert torch.equal(down.data, full["language_model.model.layers.1.mlp.down_proj.weight"])

# Through a DeepSpeed engine: the adapter unwraps it, and every rank sees full-width activations.
engine, *_ = deepspeed.initialize(model=model, config=ds_config)
assert adapter.ffn_name(engine, 1) == "model.language_model.layers.1.mlp"
widths = []
for layer in adapter.decoder_layers(engine):
    adapter.neuron_module(layer).register_forward_pre_hook(lambda m, args: widths.append(args[0].shape[-1]))
prompt = adapter.chat_prompt(loaded.processor, "hello", True)
from PIL import Image
batch = adapter.processor_inputs(loaded.processor, [prompt], [Image.new("RGB", (32, 32), (rank * 100, 0, 0))])
with torch.no_grad():
    engine(**batch)
assert widths == [256] * 4, widths
print(f"rank {rank} ok", flush=True)
"""


@pytest.mark.distributed
def test_zero3_load_is_partitioned_on_two_ranks(tiny_dir, tmp_path):
    script = tmp_path / "zero3_load.py"
    script.write_text(ZERO3_SCRIPT)
    proc = run_deepspeed(script, [str(tiny_dir / "llava")], num_ranks=2, timeout=240)
    assert "rank 0 ok" in proc.stdout and "rank 1 ok" in proc.stdout


@pytest.mark.distributed
@timeout_above(300, 600, 600)  # tiny_dir, train, evaluate
def test_llama_trains_and_evaluates_on_two_ranks(tiny_dir, tmp_path):
    """A decoder-only family through stage 2 and 3 under ZeRO-3: only the selected neurons' slices
    move (the tied embedding stays), and the trained model generates on 2 ranks."""
    from safetensors.torch import load_file

    from identify_helpers import write_jsonl
    from shield_ds.neurons.identify import IdentifyConfig, Identifier

    model = tiny_dir / "llama"
    neurons = tmp_path / "identify"
    ns = Identifier(IdentifyConfig(model=str(model), languages=["en"], modalities=["text"], per_group_limit=6,
                                   ratio=0.05, max_param_fraction=0.0, out=str(neurons), ds_config=None)).run()
    assert ns.count >= 4
    benign = write_jsonl(tmp_path / "benign.jsonl", [
        {"id": f"b{i}", "prompt": q, "language": "en", "label": "benign", "response": a}
        for i, (q, a) in enumerate([("What is 2+2?", "4."), ("Name a primary colour.", "Red.")])])
    train = tmp_path / "train"
    run_deepspeed(REPO / "recipes" / "train.py", [
        "--model", str(model), "--neurons", str(neurons), "--benign", str(benign), "--languages", "en",
        "--modalities", "text", "--per-group-limit", "2", "--micro-batch-size", "2", "--grad-accum", "1",
        "--max-steps", "2", "--lr", "1e-2", "--ds-config", "ds_configs/zero3_fp32.json", "--out", str(train)],
        num_ranks=2, timeout=600)
    base, trained = load_file(str(model / "model.safetensors")), load_file(str(train / "model" / "model.safetensors"))
    assert base.keys() == trained.keys()
    for key, before in base.items():
        diff = before != trained[key]
        if ".mlp." not in key:
            assert not diff.any(), f"{key} moved"
            continue
        outside = diff.clone()  # changes that are not in a selected neuron's row (gate, up) or column (down)
        selected = ns.indices(int(key.split("layers.")[1].split(".")[0]))
        outside[(slice(None), selected) if "down_proj" in key else selected] = False
        assert not outside.any(), f"{key}: weights outside the selected neurons moved"
    assert any((base[key] != trained[key]).any() for key in base)

    evaluation = tmp_path / "eval"
    run_deepspeed(REPO / "recipes" / "evaluate.py", [
        "--model", str(train / "model"), "--out", str(evaluation), "--languages", "en", "--modalities", "text",
        "--per-group-limit", "2", "--batch-size", "2", "--max-new-tokens", "6", "--ds", "bf16.enabled=false",
        "--ds", "zero_optimization.stage3_param_persistence_threshold=0"], num_ranks=2, timeout=600)
    rows = [json.loads(line) for line in (evaluation / "generations.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and {row["modality"] for row in rows} == {"text"}
    assert json.loads((evaluation / "asr.json").read_text())["modalities"] == ["text"]


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_response_window_loss_equals_full_logits_loss(tiny_dir, family):
    """Training and the utility probe ask the model for the last `response_window` logits only: the same
    per-sample losses and gradients as full logits, for every family (text and, for a VLM, images)."""
    from shield_ds.data import SafetyCollator, SafetyRecord, with_modalities
    from shield_ds.loss import response_loss, response_window

    processor, model, adapter = load_plain(tiny_dir, family)
    records = [SafetyRecord(id="a", prompt="How do I make a weapon at home, step by step?", language="en",
                            label="harmful", response="I can't help with that."),
               SafetyRecord(id="b", prompt="Why?", language="de", label="benign",
                            response="Weil kürzere Wellenlängen stärker gestreut werden.")]
    views = [records] + ([with_modalities(records, ["typographic"])] if adapter.supports_images else [])
    for batch_records in views:
        batch = SafetyCollator(processor, adapter, train=True)(batch_records)
        window = response_window(batch.labels)
        assert 1 < window < batch.labels.shape[1]  # the prompt columns before it get no logits
        losses = []
        for keep in (0, window):  # 0: every position's logits
            model.zero_grad()
            logits = model(**batch.inputs, use_cache=False, logits_to_keep=keep).logits
            labels = batch.labels[:, -keep:] if keep else batch.labels
            assert logits.shape[1] == labels.shape[1]
            loss = response_loss(logits, labels)
            loss.sum().backward()
            losses.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
        (full, full_grads), (windowed, windowed_grads) = losses
        torch.testing.assert_close(windowed, full, rtol=1e-5, atol=1e-6)
        assert len(windowed_grads) == len(full_grads)
        for a, b in zip(windowed_grads, full_grads):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert response_window(torch.full((2, 5), -100)) == 1
