"""Published hyperparameters of the three reference VLMs, built locally with the real config classes.

No network is needed: each preset is the architecture part of the published config.json, enough
for the meta-device parameter count to match the released checkpoint.
"""

from __future__ import annotations

from typing import Callable

from transformers import LlavaConfig, MllamaConfig, PretrainedConfig, Qwen2VLConfig


def llava_15_7b() -> PretrainedConfig:
    """LLaVA-1.5-7B (llava-hf layout): Vicuna-7B (Llama-7B) text + CLIP ViT-L/14-336 vision."""
    text = dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=32, vocab_size=32064,
                max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False)
    vision = dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096,
                  num_hidden_layers=24, num_attention_heads=16, image_size=336, patch_size=14,
                  projection_dim=768)
    return LlavaConfig(text_config=text, vision_config=vision, image_token_index=32000,
                       vision_feature_layer=-2, vision_feature_select_strategy="default",
                       projector_hidden_act="gelu", tie_word_embeddings=False)


def qwen2_vl_72b() -> PretrainedConfig:
    """Qwen2-VL-72B(-Instruct): 80-layer Qwen2 text (GQA 64/8) + 32-block ViT with a 2x2 merger."""
    text = dict(hidden_size=8192, intermediate_size=29568, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8, vocab_size=152064, max_position_embeddings=32768,
                rms_norm_eps=1e-6, rope_theta=1_000_000.0, tie_word_embeddings=False)
    vision = dict(depth=32, embed_dim=1280, hidden_size=8192, mlp_ratio=4, num_heads=16, in_chans=3,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    return Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False)


def llama_32_90b_vision() -> PretrainedConfig:
    """Llama-3.2-90B-Vision: 100-layer text model (20 of them cross-attention) + tiled ViT-H/14."""
    text = dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=100, num_attention_heads=64,
                num_key_value_heads=8, vocab_size=128256, cross_attention_layers=list(range(3, 100, 5)),
                max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500_000.0,
                rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                  original_max_position_embeddings=8192),
                tie_word_embeddings=False)
    vision = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_global_layers=8,
                  attention_heads=16, image_size=560, patch_size=14, max_num_tiles=4, vision_output_dim=7680,
                  intermediate_layers_indices=[3, 7, 15, 23, 30])
    return MllamaConfig(text_config=text, vision_config=vision)


PRESETS: dict[str, Callable[[], PretrainedConfig]] = {
    "llava-1.5-7b": llava_15_7b,
    "qwen2-vl-72b": qwen2_vl_72b,
    "llama-3.2-90b-vision": llama_32_90b_vision,
}

# Sizes the model cards / papers quote, for the tests' sanity check (parameters).
PUBLISHED_PARAMS: dict[str, float] = {
    "llava-1.5-7b": 7.06e9,
    "qwen2-vl-72b": 73.4e9,
    "llama-3.2-90b-vision": 88.6e9,
}
