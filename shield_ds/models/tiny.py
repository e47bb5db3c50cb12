"""Tiny random checkpoints of every supported family, for tests and smoke runs.

Each checkpoint is a real Hugging Face directory (config, safetensors weights, processor with a
byte-level tokenizer and a chat template) that plain `AutoProcessor.from_pretrained` and
`AutoModelForImageTextToText.from_pretrained` load; the decoder-only families (llama, mistral,
qwen2, gemma3_text) are a tokenizer and a `*ForCausalLM` (`AutoTokenizer`, `AutoModelForCausalLM`).
Building is seeded and deterministic: two builds with the same seed write byte-identical weight files.

    python -m shield_ds.models.tiny --arch llava --out /tmp/tiny-llava
    python -m shield_ds.models.tiny --arch all --out /tmp/tiny      # one subdirectory per family
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, PreTrainedTokenizerFast

from shield_ds import dist
from shield_ds.defaults import DEFAULT_ARCH, TINY_MARKER, default_model_dir
from shield_ds.io import atomic_dir
from shield_ds.errors import ShieldError
from shield_ds.process_group import ToolParser, exit_on_error

TINY_VLM_FAMILIES = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "mllama", "gemma3", "idefics3")
TINY_LLM_FAMILIES = ("llama", "mistral", "qwen2", "gemma3_text")
TINY_FAMILIES = TINY_VLM_FAMILIES + TINY_LLM_FAMILIES

# Shared tiny sizes (see FAMILY-NOTES): text hidden 64, 4 heads / 2 KV heads of 16, vision hidden 32.
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=1024)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              image_size=32, patch_size=8)
IMAGE_MEAN = [0.5, 0.5, 0.5]
IMAGE_STD = [0.5, 0.5, 0.5]

# Chat templates. They accept `content` as a string or as a list of {"type": "image"|"text"} parts,
# and end the generation prompt exactly where the assistant's answer starts, so that
# prompt + answer + end-of-turn is the rendered full conversation.
_CONTENT = ("{% if message['content'] is string %}{{ message['content'] }}{% else %}"
            "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ IMG }}"
            "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}")


def _template(img: str, start: str, user: str, user_end: str, assistant: str, assistant_end: str,
              gen: str) -> str:
    """A chat template: `start` once, then user turns `user + content + user_end`, assistant turns
    `assistant + content + assistant_end`, and `gen` as the generation prompt."""
    content = _CONTENT.replace("{{ IMG }}", img)
    return (
        start
        + "{% for message in messages %}"
        + "{% if message['role'] == 'assistant' %}" + assistant + content + assistant_end
        + "{% else %}" + user + content + user_end + "{% endif %}"
        + "{% endfor %}"
        + "{% if add_generation_prompt %}" + gen + "{% endif %}"
    )


def _byte_to_char() -> dict[int, str]:
    """The ByteLevel alphabet: printable latin-1 bytes stand for themselves, the rest are shifted
    past 255 so every byte has a visible character (the mapping the `tokenizers` ByteLevel
    pre-tokenizer applies)."""
    visible = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    mapping: dict[int, str] = {}
    shifted = 0
    for byte in range(256):
        if byte in visible:
            mapping[byte] = chr(byte)
        else:
            mapping[byte] = chr(256 + shifted)
            shifted += 1
    return mapping


def byte_tokenizer(special_tokens: list[str], named: dict[str, str],
                   extra_named: dict[str, str] | None = None, chat_template: str | None = None
                   ) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer: ids 0-255 are the bytes, `special_tokens` follow from id 256.

    `named` maps the standard roles (bos_token, eos_token, pad_token, unk_token) to special tokens;
    `extra_named` adds model-specific named tokens (image_token, boi_token, ...) that processors
    read as tokenizer attributes.
    """
    vocab = {char: byte for byte, char in _byte_to_char().items()}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(special_tokens)
    assert backend.get_vocab_size() == 256 + len(special_tokens)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, extra_special_tokens=extra_named or {},
                                        clean_up_tokenization_spaces=False, **named)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def _ids(tokenizer: PreTrainedTokenizerFast, *tokens: str) -> list[int]:
    return [tokenizer.convert_tokens_to_ids(token) for token in tokens]


# --------------------------------------------------------------------------------------------
# One builder per family: returns (config, processor); the model is made from the config.

LLAMA_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
LLAMA_NAMED = dict(unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>")
# LLaVA-1.5 style: "<s>USER: <image>\n... ASSISTANT:" then " answer</s>".
LLAVA_TEMPLATE = _template("<image>\n", "{{ bos_token }}", "USER: ", " ", "ASSISTANT: ", "</s>", "ASSISTANT:")


def _llama_text(tokenizer, **overrides) -> dict:
    unk, bos, eos, pad = _ids(tokenizer, "<unk>", "<s>", "</s>", "<pad>")
    return dict(TEXT, model_type="llama", vocab_size=len(tokenizer), bos_token_id=bos,
                eos_token_id=eos, pad_token_id=pad, tie_word_embeddings=False, **overrides)


def _clip_vision() -> transformers.CLIPVisionConfig:
    return transformers.CLIPVisionConfig(**VISION, projection_dim=32, hidden_act="quick_gelu")


def _build_llava(arch: str):
    tokenizer = byte_tokenizer(LLAMA_SPECIALS, LLAMA_NAMED, {"image_token": "<image>"}, LLAVA_TEMPLATE)
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    # >= 4 language layers and 256 neurons per layer so that neuron selection has room to choose.
    text = _llama_text(tokenizer, num_hidden_layers=4, intermediate_size=256)
    common = dict(vision_config=_clip_vision(), text_config=text, image_token_index=image_token_id,
                  vision_feature_layer=-2, vision_feature_select_strategy="default",
                  projector_hidden_act="gelu")
    size = {"shortest_edge": VISION["image_size"]}
    crop = {"height": VISION["image_size"], "width": VISION["image_size"]}
    if arch == "llava":
        config = transformers.LlavaConfig(**common, image_seq_length=16)
        image_processor = transformers.CLIPImageProcessor(size=size, crop_size=crop, image_mean=IMAGE_MEAN,
                                                          image_std=IMAGE_STD)
        processor_class = transformers.LlavaProcessor
    else:
        pinpoints = [[32, 32], [32, 64], [64, 32], [64, 64]]
        config = transformers.LlavaNextConfig(**common, image_grid_pinpoints=pinpoints, image_seq_length=16)
        image_processor = transformers.LlavaNextImageProcessor(size=size, crop_size=crop,
                                                               image_grid_pinpoints=pinpoints,
                                                               image_mean=IMAGE_MEAN, image_std=IMAGE_STD)
        processor_class = transformers.LlavaNextProcessor
    processor = processor_class(image_processor=image_processor, tokenizer=tokenizer,
                                patch_size=VISION["patch_size"], vision_feature_select_strategy="default",
                                num_additional_image_tokens=1, chat_template=LLAVA_TEMPLATE, image_token="<image>")
    return config, processor


QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>"]
QWEN_TEMPLATE = _template("<|vision_start|><|image_pad|><|vision_end|>", "",
                          "<|im_start|>{{ message['role'] }}\n", "<|im_end|>\n", "<|im_start|>assistant\n", "<|im_end|>\n",
                          "<|im_start|>assistant\n")


def _build_qwen(arch: str):
    tokenizer = byte_tokenizer(QWEN_SPECIALS, dict(eos_token="<|im_end|>", pad_token="<|endoftext|>"),
                               {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                                "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>"},
                               QWEN_TEMPLATE)
    pad, eos, vstart, vend, image, video = _ids(tokenizer, "<|endoftext|>", "<|im_end|>", "<|vision_start|>",
                                                "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
    # mrope_section sums to head_dim / 2 (temporal, height, width rotary channels).
    text = dict(TEXT, vocab_size=len(tokenizer), bos_token_id=None, eos_token_id=eos, pad_token_id=pad,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    # 32x32 images, patch 4, 2x2 merge: an 8x8 patch grid -> 16 image tokens.
    patch, merge = 4, 2
    common_vision = dict(depth=2, num_heads=4, patch_size=patch, spatial_merge_size=merge, temporal_patch_size=2)
    ids = dict(image_token_id=image, video_token_id=video, vision_start_token_id=vstart, vision_end_token_id=vend)
    if arch == "qwen2_vl":
        vision = dict(common_vision, embed_dim=32, mlp_ratio=2, hidden_size=TEXT["hidden_size"])
        config = transformers.Qwen2VLConfig(text_config=text, vision_config=vision, **ids)
        processor_class = transformers.Qwen2VLProcessor
    else:
        # window_size is in pixels: 16 px = one 2x2 block of merged patches.
        vision = dict(common_vision, hidden_size=32, intermediate_size=64, out_hidden_size=TEXT["hidden_size"],
                      window_size=16, fullatt_block_indexes=[1])
        config = transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
        processor_class = transformers.Qwen2_5_VLProcessor
    pixels = VISION["image_size"] ** 2
    size = {"shortest_edge": pixels, "longest_edge": pixels}
    image_processor = transformers.Qwen2VLImageProcessor(size=size, patch_size=patch, merge_size=merge,
                                                         temporal_patch_size=2, image_mean=IMAGE_MEAN,
                                                         image_std=IMAGE_STD)
    video_processor = transformers.Qwen2VLVideoProcessor(size=size, patch_size=patch, merge_size=merge,
                                                         temporal_patch_size=2, image_mean=IMAGE_MEAN,
                                                         image_std=IMAGE_STD)
    processor = processor_class(image_processor=image_processor, tokenizer=tokenizer,
                                video_processor=video_processor, chat_template=QWEN_TEMPLATE)
    return config, processor


MLLAMA_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>", "<|start_header_id|>",
                   "<|end_header_id|>", "<|eot_id|>", "<|python_tag|>", "<|image|>"]
MLLAMA_TEMPLATE = _template("<|image|>", "{{ bos_token }}",
                            "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n", "<|eot_id|>",
                            "<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>",
                            "<|start_header_id|>assistant<|end_header_id|>\n\n")


def _build_mllama(arch: str):
    tokenizer = byte_tokenizer(MLLAMA_SPECIALS, dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                                     pad_token="<|finetune_right_pad_id|>"),
                               {"image_token": "<|image|>"}, MLLAMA_TEMPLATE)
    bos, eos, pad, image = _ids(tokenizer, "<|begin_of_text|>", "<|eot_id|>", "<|finetune_right_pad_id|>",
                                "<|image|>")
    # Three layers, the middle one a cross-attention layer (self, cross, self).
    text = transformers.MllamaTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, cross_attention_layers=[1], max_position_embeddings=1024,
        bos_token_id=bos, eos_token_id=eos, pad_token_id=pad, tie_word_embeddings=False)
    vision = transformers.MllamaVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_global_layers=1, attention_heads=4,
        image_size=32, patch_size=8, max_num_tiles=4, intermediate_layers_indices=[0], vision_output_dim=64)
    config = transformers.MllamaConfig(vision_config=vision, text_config=text, image_token_index=image)
    image_processor = transformers.MllamaImageProcessor(size={"height": 32, "width": 32}, max_image_tiles=4,
                                                        image_mean=IMAGE_MEAN, image_std=IMAGE_STD)
    processor = transformers.MllamaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                             chat_template=MLLAMA_TEMPLATE)
    return config, processor


GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
                  "<end_of_image>", "<image_soft_token>"]
GEMMA_TEMPLATE = _template("<start_of_image>", "{{ bos_token }}",
                           "<start_of_turn>user\n", "<end_of_turn>\n", "<start_of_turn>model\n", "<end_of_turn>\n",
                           "<start_of_turn>model\n")


def _build_gemma3(arch: str):
    tokenizer = byte_tokenizer(GEMMA_SPECIALS, dict(pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                                    unk_token="<unk>"),
                               {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                                "image_token": "<image_soft_token>"}, GEMMA_TEMPLATE)
    pad, eos, bos, boi, eoi, image = _ids(tokenizer, "<pad>", "<eos>", "<bos>", "<start_of_image>",
                                          "<end_of_image>", "<image_soft_token>")
    text = transformers.Gemma3TextConfig(
        **TEXT, vocab_size=len(tokenizer), pad_token_id=pad, eos_token_id=eos, bos_token_id=bos,
        query_pre_attn_scalar=16, sliding_window=64, layer_types=["sliding_attention", "full_attention"])
    vision = transformers.SiglipVisionConfig(**VISION, vision_use_head=False)
    # 4x4 patches per image pooled to 2x2 = 4 soft tokens (a perfect square dividing patches per side).
    config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                       boi_token_index=boi, eoi_token_index=eoi, image_token_index=image)
    image_processor = transformers.Gemma3ImageProcessor(size={"height": 32, "width": 32}, image_mean=IMAGE_MEAN,
                                                        image_std=IMAGE_STD, do_pan_and_scan=False)
    processor = transformers.Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer,
                                             chat_template=GEMMA_TEMPLATE, image_seq_length=4)
    return config, processor


IDEFICS_SPECIALS = (["<|begin_of_text|>", "<end_of_utterance>", "<|finetune_right_pad_id|>",
                     "<fake_token_around_image>", "<image>", "<global-img>"]
                    + [f"<row_{row}_col_{col}>" for row in range(1, 7) for col in range(1, 7)])
# Idefics3 style: "<|begin_of_text|>User:<image>...<end_of_utterance>\nAssistant:" then " answer<end_of_utterance>\n".
IDEFICS_TEMPLATE = _template("<image>", "{{ bos_token }}", "{{ message['role'] | capitalize }}:",
                             "<end_of_utterance>\n", "Assistant: ", "<end_of_utterance>\n", "Assistant:")


def _build_idefics3(arch: str):
    tokenizer = byte_tokenizer(IDEFICS_SPECIALS, dict(bos_token="<|begin_of_text|>", eos_token="<end_of_utterance>",
                                                      pad_token="<|finetune_right_pad_id|>"),
                               {"image_token": "<image>"}, IDEFICS_TEMPLATE)
    bos, eos, pad, image = _ids(tokenizer, "<|begin_of_text|>", "<end_of_utterance>", "<|finetune_right_pad_id|>",
                                "<image>")
    text = dict(TEXT, model_type="llama", vocab_size=len(tokenizer), bos_token_id=bos, eos_token_id=eos,
                pad_token_id=pad, tie_word_embeddings=False)
    vision = transformers.Idefics3VisionConfig(**VISION)
    # image_seq_len = (image / patch)^2 / scale_factor^2 = 16 / 4 = 4 tokens per tile.
    config = transformers.Idefics3Config(vision_config=vision, text_config=text, scale_factor=2,
                                         image_token_id=image, tie_word_embeddings=False)
    # Images are resized to a 64 px longest edge and split into 32 px tiles plus a global view.
    image_processor = transformers.Idefics3ImageProcessor(size={"longest_edge": 64},
                                                          max_image_size={"longest_edge": 32},
                                                          do_image_splitting=True, image_mean=IMAGE_MEAN,
                                                          image_std=IMAGE_STD)
    processor = transformers.Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer,
                                               image_seq_len=4, chat_template=IDEFICS_TEMPLATE)
    return config, processor


# ---- decoder-only families: the "processor" is the tokenizer ----------------------------------

# Llama 3 style: "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n...<|eot_id|>" etc.
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                   "<|finetune_right_pad_id|>"]
LLAMA3_TEMPLATE = _template("", "{{ bos_token }}", "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n",
                            "<|eot_id|>", "<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>",
                            "<|start_header_id|>assistant<|end_header_id|>\n\n")
# Mistral instruct style: "<s>[INST] ... [/INST]" then " answer</s>".
MISTRAL_SPECIALS = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"]
MISTRAL_TEMPLATE = _template("", "{{ bos_token }}", "[INST] ", " [/INST]", " ", "</s>", "")
QWEN2_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _build_llm(arch: str):
    """Tokenizer and config of a tiny decoder-only model (shared TEXT sizes)."""
    if arch == "llama":
        # Tied embeddings like SmolLM2 and Llama 3.2 1B.
        tokenizer = byte_tokenizer(LLAMA3_SPECIALS, dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                                         pad_token="<|finetune_right_pad_id|>"),
                                   chat_template=LLAMA3_TEMPLATE)
        bos, eos, pad = _ids(tokenizer, "<|begin_of_text|>", "<|eot_id|>", "<|finetune_right_pad_id|>")
        config = transformers.LlamaConfig(**TEXT, vocab_size=len(tokenizer), bos_token_id=bos, eos_token_id=eos,
                                          pad_token_id=pad, tie_word_embeddings=True)
    elif arch == "mistral":
        # No pad token, as in the original: the loader pads with EOS.
        tokenizer = byte_tokenizer(MISTRAL_SPECIALS, dict(unk_token="<unk>", bos_token="<s>", eos_token="</s>"),
                                   chat_template=MISTRAL_TEMPLATE)
        bos, eos = _ids(tokenizer, "<s>", "</s>")
        config = transformers.MistralConfig(**TEXT, vocab_size=len(tokenizer), bos_token_id=bos, eos_token_id=eos,
                                            sliding_window=None, tie_word_embeddings=False)
    elif arch == "qwen2":
        tokenizer = byte_tokenizer(QWEN2_SPECIALS, dict(eos_token="<|im_end|>", pad_token="<|endoftext|>"),
                                   chat_template=_template("", "", "<|im_start|>{{ message['role'] }}\n",
                                                           "<|im_end|>\n", "<|im_start|>assistant\n",
                                                           "<|im_end|>\n", "<|im_start|>assistant\n"))
        eos, pad = _ids(tokenizer, "<|im_end|>", "<|endoftext|>")
        config = transformers.Qwen2Config(**TEXT, vocab_size=len(tokenizer), bos_token_id=None, eos_token_id=eos,
                                          pad_token_id=pad, tie_word_embeddings=False)
    else:
        # Gemma 3 1B/270M: gelu_pytorch_tanh, tied and scaled embeddings, pre/post feed-forward norms.
        tokenizer = byte_tokenizer(GEMMA_SPECIALS[:6], dict(pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                                            unk_token="<unk>"), chat_template=GEMMA_TEMPLATE)
        pad, eos, bos = _ids(tokenizer, "<pad>", "<eos>", "<bos>")
        config = transformers.Gemma3TextConfig(
            **TEXT, vocab_size=len(tokenizer), pad_token_id=pad, eos_token_id=eos, bos_token_id=bos,
            query_pre_attn_scalar=16, sliding_window=64, layer_types=["sliding_attention", "full_attention"])
    return config, tokenizer


BUILDERS = {"llama": _build_llm, "mistral": _build_llm, "qwen2": _build_llm, "gemma3_text": _build_llm,
            "llava": _build_llava, "llava_next": _build_llava, "qwen2_vl": _build_qwen,
            "qwen2_5_vl": _build_qwen, "mllama": _build_mllama, "gemma3": _build_gemma3,
            "idefics3": _build_idefics3}


def _wake_zero_inits(model: torch.nn.Module, arch: str, generator: torch.Generator) -> None:
    """Give zero-initialised gates and projectors small non-zero values, so that images really
    change the language model's activations in a tiny random checkpoint."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if arch == "mllama" and name.split(".")[-1] in ("cross_attn_attn_gate", "cross_attn_mlp_gate", "gate"):
                param.copy_(0.5 + 0.25 * torch.rand(param.shape, generator=generator))
            if arch == "gemma3" and name.endswith("mm_input_projection_weight"):
                fan_in = param.shape[0]
                param.copy_(torch.randn(param.shape, generator=generator) / fan_in ** 0.5)


def build_tiny(arch: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny random checkpoint of family `arch` (config, weights, processor) to `out_dir`."""
    if arch not in BUILDERS:
        raise ShieldError(f"unknown tiny architecture '{arch}'; choose one of: {', '.join(TINY_FAMILIES)}, all")
    out_dir = Path(out_dir)
    config, processor = BUILDERS[arch](arch)
    setattr(config, TINY_MARKER, True)  # read by is_tiny_checkpoint: reports say its numbers cannot move
    torch.manual_seed(seed)
    auto_class = AutoModelForCausalLM if arch in TINY_LLM_FAMILIES else AutoModelForImageTextToText
    model = auto_class.from_config(config, dtype=torch.float32)
    _wake_zero_inits(model, arch, torch.Generator().manual_seed(seed + 1))
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


def default_model() -> Path:
    """The tiny default checkpoint, built (seeded, identical every time) by rank 0 on first use."""
    path = default_model_dir()
    if not (path / "config.json").exists() and dist.is_rank0():
        with atomic_dir(path) as tmp:
            build_tiny(DEFAULT_ARCH, tmp)
    dist.barrier()
    return path


@exit_on_error
def main(argv: list[str] | None = None) -> None:
    parser = ToolParser(prog="python -m shield_ds.models.tiny", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", required=True, choices=[*TINY_FAMILIES, "all"])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.arch == "all":
        written = {arch: str(build_tiny(arch, args.out / arch, args.seed)) for arch in TINY_FAMILIES}
    else:
        written = {args.arch: str(build_tiny(args.arch, args.out, args.seed))}
    print(json.dumps(written, indent=2))


if __name__ == "__main__":
    main()
