"""GGUF import: a GGUF file written here from the tiny llama checkpoint (llama.cpp's tensor names and
rotary layout, Q8_0-quantized FFNs, a byte-level tokenizer with a chat template) converts into a
Hugging Face checkpoint with the same weights, tokenizer and logits; bad input is one line, exit 2."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_one_line_error
from shield_ds.errors import ShieldError
from shield_ds.models import load_model
from shield_ds.models.convert import convert_gguf, main

gguf = pytest.importorskip("gguf", reason="GGUF import needs the optional `gguf` package")

Q8 = gguf.GGMLQuantizationType.Q8_0
QUANTIZED = (".mlp.gate_proj.", ".mlp.up_proj.", ".mlp.down_proj.")


def _rotary_interleave(weight, heads: int):
    """llama.cpp stores q/k rows per head with the two rotary halves interleaved."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def write_llama_gguf(src: Path, dst: Path, architecture: str = "llama") -> None:
    """A GGUF file of the tiny llama checkpoint `src` (FFN weights Q8_0, the rest float32)."""
    from transformers import AutoTokenizer

    cfg = json.loads((src / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(src)
    writer = gguf.GGUFWriter(str(dst), architecture)
    writer.add_name("tiny-llama")
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(cfg["num_attention_heads"])
    writer.add_head_count_kv(cfg["num_key_value_heads"])
    writer.add_rope_dimension_count(cfg["head_dim"])
    writer.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_vocab_size(cfg["vocab_size"])
    tokens = [token for token, _ in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])]
    special = set(tokenizer.all_special_tokens)
    writer.add_tokenizer_model("gpt2")  # byte-level BPE; no merges: every byte is one token
    writer.add_tokenizer_pre("llama-bpe")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if token in special else gguf.TokenType.NORMAL
                            for token in tokens])
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_chat_template(tokenizer.chat_template)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg["num_hidden_layers"])
    for key, tensor in load_file(str(src / "model.safetensors")).items():
        array = tensor.float().numpy()
        if key.endswith("q_proj.weight"):
            array = _rotary_interleave(array, cfg["num_attention_heads"])
        elif key.endswith("k_proj.weight"):
            array = _rotary_interleave(array, cfg["num_key_value_heads"])
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if any(part in key for part in QUANTIZED):
            writer.add_tensor(name, gguf.quantize(array, Q8), raw_dtype=Q8)
        else:
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _expected_weights(src: Path) -> dict[str, torch.Tensor]:
    """The tiny checkpoint's weights as the GGUF holds them (FFNs through a Q8_0 round trip)."""
    weights = load_file(str(src / "model.safetensors"))
    for key, tensor in weights.items():
        if any(part in key for part in QUANTIZED):
            weights[key] = torch.from_numpy(gguf.dequantize(gguf.quantize(tensor.numpy(), Q8), Q8).copy())
    return weights


@pytest.fixture(scope="module")
def tiny_gguf(tiny_checkpoint, tmp_path_factory) -> tuple[Path, Path]:
    src = tiny_checkpoint("llama")
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.Q8_0.gguf"
    write_llama_gguf(src, path)
    return src, path


def test_gguf_converts_to_an_equal_checkpoint(tiny_gguf, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, path = tiny_gguf
    out = tmp_path / "converted"
    main(["--gguf", str(path), "--out", str(out)])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {"out": str(out)}
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= {
        p.name for p in out.iterdir()}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging directory left

    # Same weights: float32 tensors exactly, Q8_0 ones as de-quantized; embeddings stay tied.
    expected, converted = _expected_weights(src), load_file(str(out / "model.safetensors"))
    assert expected.keys() == converted.keys()
    for key in expected:
        assert torch.equal(converted[key], expected[key]), key

    # Same tokenizer (bytes, special tokens, chat template) and the same logits.
    original, again = AutoTokenizer.from_pretrained(src), AutoTokenizer.from_pretrained(out)
    text = "Héllo <|eot_id|> мир 🔒"
    assert again(text)["input_ids"] == original(text)["input_ids"]
    assert again.chat_template == original.chat_template
    assert (again.bos_token, again.eos_token, again.pad_token) == (original.bos_token, original.eos_token,
                                                                   original.pad_token)
    reference = AutoModelForCausalLM.from_pretrained(src).eval()
    missing, unexpected = reference.load_state_dict(expected, strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected  # tied to the embedding
    loaded = load_model(out)
    assert loaded.adapter.model_type == "llama" and loaded.config.tie_word_embeddings
    batch = loaded.adapter.processor_inputs(loaded.processor, [
        loaded.adapter.chat_prompt(loaded.processor, question, False) for question in ("hi", "What is 2+2?")], None)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(**batch).logits, reference(**batch).logits, rtol=0, atol=1e-5)

    # bfloat16 output, --chat-template, and --overwrite replaces the directory.
    template = tmp_path / "plain.jinja"
    template.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    convert_gguf(path, out, dtype="bfloat16", overwrite=True, chat_template=template)
    assert (out / "chat_template.jinja").read_text() == template.read_text()
    assert all(t.dtype == torch.bfloat16 for t in load_file(str(out / "model.safetensors")).values())


def test_bad_input_is_one_line_and_writes_nothing(tiny_gguf, tmp_path, capsys):
    src, path = tiny_gguf
    out = tmp_path / "out"

    def refused(gguf_file: Path, *needles: str, target: Path = out, **kwargs) -> None:
        with pytest.raises(ShieldError) as err:
            convert_gguf(gguf_file, target, **kwargs)
        message = str(err.value)
        assert "\n" not in message and all(needle in message for needle in needles), message

    # Through the command line's main: one line on stderr, exit 2.
    text = tmp_path / "notes.gguf"
    text.write_text("not a model\n")
    with pytest.raises(SystemExit) as exited:
        main(["--gguf", str(text), "--out", str(out)])
    ran = subprocess.CompletedProcess(["convert"], exited.value.code, "", capsys.readouterr().err)
    assert_one_line_error(ran, "notes.gguf", "not a GGUF file")

    refused(tmp_path / "missing.gguf", "missing.gguf")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(path.read_bytes()[:200])
    refused(truncated, "truncated.gguf")
    # A well-formed GGUF of an architecture shield-ds has no adapter for.
    other = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(other), "gpt2")
    writer.add_context_length(64), writer.add_embedding_length(32), writer.add_block_count(1)
    writer.add_feed_forward_length(64), writer.add_head_count(2), writer.add_vocab_size(8)
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    refused(other, "unsupported architecture 'gpt2'", "llama")
    refused(path, "--dtype", dtype="float16")
    refused(path, "--chat-template", chat_template=tmp_path / "no-template.jinja")
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

    # An existing non-empty --out is left as it was.
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    refused(path, str(busy), "--overwrite", target=busy)
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]
