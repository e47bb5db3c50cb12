"""Family adapters: where each vision-language or decoder-only family keeps its FFNs, neurons,
vision tower, image tokens and prompt format.

A *neuron* is one channel of the gated FFN activation `act(gate_proj(x)) * up_proj(x)`, i.e. one
input channel of `down_proj`: row i of gate_proj and up_proj and column i of down_proj belong to
neuron i. Everything else in shield-ds reaches the model only through these adapters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from shield_ds.dist import get_logger
from shield_ds.errors import ShieldError

log = get_logger("models")

# Prompt format for a decoder-only checkpoint without a chat template (a base model): the answer
# follows after one space, and the tokenizer's EOS token ends the assistant's turn.
PLAIN_PROMPT_FORMAT = "User: {prompt}\nAssistant:"
_warned_plain: set[str] = set()


@dataclass(frozen=True)
class FFNProjections:
    """The linear maps of one FFN, split by how they index neurons."""

    rows: dict[str, nn.Linear]  # weight ROW i belongs to neuron i (gate_proj, up_proj; fc1 where not gated)
    down: nn.Linear  # weight COLUMN i belongs to neuron i; its forward input is the neuron activation


def unwrap_model(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside a DeepSpeed engine (or other `.module` wrapper)."""
    while not isinstance(model, PreTrainedModel) and isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


def _ffn_of(mlp: nn.Module) -> FFNProjections | None:
    """The projections of a gated (gate/up/down) or plain (fc1/fc2) MLP module, else None."""
    if all(isinstance(getattr(mlp, name, None), nn.Linear) for name in ("gate_proj", "up_proj", "down_proj")):
        return FFNProjections(rows={"gate_proj": mlp.gate_proj, "up_proj": mlp.up_proj}, down=mlp.down_proj)
    if all(isinstance(getattr(mlp, name, None), nn.Linear) for name in ("fc1", "fc2")):
        return FFNProjections(rows={"fc1": mlp.fc1}, down=mlp.fc2)
    return None


class FamilyAdapter:
    """Defaults fit a Llama-like language model at `model.model.<language_attr>.layers[i].mlp`.

    Subclasses set the class attributes and override the few methods where their family differs.
    """

    model_type: str = ""
    language_attr: str = "language_model"  # attribute of the inner model holding the decoder
    vision_attr: str = "vision_tower"  # attribute of the inner model holding the vision encoder
    # Token strings that stand for images in the prompt (placeholders, boundaries, tiles); the ones
    # a tokenizer does not know are skipped.
    image_token_names: tuple[str, ...] = ("<image>",)
    nested_images: bool = False  # processor wants one list of images per sample
    supports_images: bool = True  # False for text-only (decoder-only) families

    def check_modalities(self, modalities) -> None:
        """ShieldError when a text-only family is asked for image views (typographic, image)."""
        if self.supports_images:
            return
        visual = [m for m in modalities if m != "text"]
        if visual:
            raise ShieldError(f"{self.model_type} is a text-only model: modality '{visual[0]}' needs images; "
                              f"use --modalities text")

    # ---- config facts -------------------------------------------------------------------
    def text_config(self, config) -> Any:
        """The language model's config inside the composite VLM config."""
        return getattr(config, "text_config", config)

    def num_layers(self, config) -> int:
        return int(self.text_config(config).num_hidden_layers)

    def hidden_size(self, config) -> int:
        return int(self.text_config(config).hidden_size)

    def intermediate_size(self, config) -> int:
        return int(self.text_config(config).intermediate_size)

    def text_only_skipped_layers(self, config) -> list[int]:
        """Decoder layers that do not run at all on a batch without images (their hooks never fire)."""
        return []

    def param_count_per_neuron(self, config) -> int:
        """Parameters one neuron owns: its gate and up rows and its down column (+ row biases)."""
        text = self.text_config(config)
        biases = 2 if getattr(text, "mlp_bias", False) else 0
        return 3 * self.hidden_size(config) + biases

    # ---- module lookup --------------------------------------------------------------------
    def language_model(self, model: nn.Module) -> nn.Module:
        model = unwrap_model(model)
        inner = getattr(model, "model", model)
        return getattr(inner, self.language_attr)

    def decoder_layers(self, model: nn.Module) -> list[nn.Module]:
        """The language model's decoder layers, in order."""
        return list(self.language_model(model).layers)

    def ffn(self, layer: nn.Module) -> FFNProjections:
        projections = _ffn_of(layer.mlp)
        if projections is None:
            raise ShieldError(f"{self.model_type}: decoder layer {type(layer).__name__} has no gate/up/down MLP")
        return projections

    def ffn_name(self, model: nn.Module, layer_index: int) -> str:
        """Qualified module name of layer `layer_index`'s MLP, e.g. 'model.language_model.layers.3.mlp'
        (tests/test_models.py checks each adapter's layer path with it, also under a DeepSpeed engine)."""
        model = unwrap_model(model)
        target = self.decoder_layers(model)[layer_index].mlp
        for name, module in model.named_modules():
            if module is target:
                return name
        raise ShieldError(f"{self.model_type}: MLP of layer {layer_index} not found in the model")

    def neuron_module(self, layer: nn.Module) -> nn.Module:
        """The module whose forward input [..., intermediate] is the neuron activation (down_proj)."""
        return self.ffn(layer).down

    def vision_mlps(self, model: nn.Module) -> list[tuple[str, FFNProjections]]:
        """(qualified name, projections) of every MLP in the vision encoder, in module order."""
        model = unwrap_model(model)
        inner = getattr(model, "model", model)
        tower = getattr(inner, self.vision_attr)
        prefix = next(name for name, module in model.named_modules() if module is tower)
        found = []
        for name, module in tower.named_modules():
            if name.split(".")[-1] == "mlp" and (projections := _ffn_of(module)) is not None:
                found.append((f"{prefix}.{name}", projections))
        return found

    # ---- tokens and prompts ---------------------------------------------------------------
    def image_token_ids(self, processor) -> list[int]:
        """Token ids to leave out of statistics: image placeholders, boundaries, tile markers."""
        tokenizer = getattr(processor, "tokenizer", processor)
        vocab = tokenizer.get_vocab()
        return sorted({vocab[name] for name in self.image_token_names if name in vocab})

    def _messages(self, text: str, has_image: bool, response: str | None = None) -> list[dict]:
        content = ([{"type": "image"}] if has_image else []) + [{"type": "text", "text": text}]
        messages = [{"role": "user", "content": content}]
        if response is not None:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": response}]})
        return messages

    def chat_prompt(self, processor, text: str, has_image: bool) -> str:
        """The user turn (with the image placeholder when `has_image`) and the generation prompt."""
        return processor.apply_chat_template(self._messages(text, has_image), add_generation_prompt=True,
                                             tokenize=False)

    def chat_full(self, processor, text: str, has_image: bool, response: str) -> str:
        """chat_prompt followed by the assistant's `response` and its end of turn."""
        prompt = self.chat_prompt(processor, text, has_image)
        full = processor.apply_chat_template(self._messages(text, has_image, response), tokenize=False)
        if full.startswith(prompt) and response in full[len(prompt):]:
            return full
        # Some templates render a finished conversation differently from prompt + answer (e.g.
        # stripping whitespace); training needs the prompt as an exact prefix.
        return prompt + response + self.end_of_turn(processor)

    def end_of_turn(self, processor) -> str:
        tokenizer = getattr(processor, "tokenizer", processor)
        return tokenizer.eos_token or ""

    def processor_inputs(self, processor, texts: list[str], images: list | None,
                         padding_side: str = "left") -> dict[str, torch.Tensor]:
        """Tokenize a batch into model inputs: every sample has one image, or none has (`images`
        None or empty). Mixed batches are not supported (mllama's processor cannot pad them)."""
        if images is not None and len(images) != len(texts):
            raise ShieldError(f"{self.model_type}: {len(texts)} texts but {len(images)} images in one batch")
        if images and not self.supports_images:
            raise ShieldError(f"{self.model_type} is a text-only model: it cannot take images")
        tokenizer = getattr(processor, "tokenizer", processor)
        if tokenizer.pad_token is None and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token  # e.g. Mistral and Llama 3 ship without one
        # Chat templates that already write the BOS token must not get a second one.
        bos = tokenizer.bos_token
        add_special_tokens = not (bos and all(text.startswith(bos) for text in texts))
        kwargs: dict[str, Any] = dict(text=list(texts), return_tensors="pt", padding=True,
                                      padding_side=padding_side, add_special_tokens=add_special_tokens)
        if images:
            kwargs["images"] = [[image] for image in images] if self.nested_images else list(images)
        batch = processor(**kwargs)
        return self._model_inputs(dict(batch))

    def _model_inputs(self, batch: dict) -> dict[str, torch.Tensor]:
        return {key: value for key, value in batch.items() if isinstance(value, torch.Tensor)}


class LlavaAdapter(FamilyAdapter):
    model_type = "llava"
    image_token_names = ("<image>",)


class LlavaNextAdapter(LlavaAdapter):
    model_type = "llava_next"


class Qwen2VLAdapter(FamilyAdapter):
    model_type = "qwen2_vl"
    vision_attr = "visual"
    image_token_names = ("<|image_pad|>", "<|vision_start|>", "<|vision_end|>", "<|video_pad|>")

    def end_of_turn(self, processor) -> str:
        return "<|im_end|>\n"


class Qwen2_5_VLAdapter(Qwen2VLAdapter):
    model_type = "qwen2_5_vl"


class MllamaAdapter(FamilyAdapter):
    """Decoder layers alternate self-attention and cross-attention layers; both have an MLP.

    On text-only input the cross-attention layers are skipped entirely, so their MLPs see no tokens.
    """

    model_type = "mllama"
    vision_attr = "vision_model"
    image_token_names = ("<|image|>",)
    nested_images = True

    def end_of_turn(self, processor) -> str:
        return "<|eot_id|>"

    def cross_attention_layers(self, config) -> list[int]:
        return list(self.text_config(config).cross_attention_layers)

    def text_only_skipped_layers(self, config) -> list[int]:
        return self.cross_attention_layers(config)


class Gemma3Adapter(FamilyAdapter):
    model_type = "gemma3"
    image_token_names = ("<start_of_image>", "<image_soft_token>", "<end_of_image>")

    nested_images = True

    def end_of_turn(self, processor) -> str:
        return "<end_of_turn>\n"


class Idefics3Adapter(FamilyAdapter):
    model_type = "idefics3"
    language_attr = "text_model"
    vision_attr = "vision_model"
    image_token_names = (("<image>", "<fake_token_around_image>", "<global-img>")
                         + tuple(f"<row_{row}_col_{col}>" for row in range(1, 7) for col in range(1, 7)))
    nested_images = True

    def end_of_turn(self, processor) -> str:
        return "<end_of_utterance>\n"


class CausalLMAdapter(FamilyAdapter):
    """A decoder-only LLM (`*ForCausalLM`): decoder layers at `model.model.layers[i].mlp`, the
    processor is the tokenizer, and only the `text` modality exists.

    A checkpoint without a chat template (a base model) gets BOS + PLAIN_PROMPT_FORMAT, with the
    answer after one space and EOS as the end of turn (and a one-time warning).
    """

    supports_images = False
    image_token_names = ()

    def language_model(self, model: nn.Module) -> nn.Module:
        model = unwrap_model(model)
        return getattr(model, "model", model)

    def vision_mlps(self, model: nn.Module) -> list[tuple[str, FFNProjections]]:
        return []

    def _messages(self, text: str, has_image: bool, response: str | None = None) -> list[dict]:
        if has_image:
            raise ShieldError(f"{self.model_type} is a text-only model: it cannot take images")
        # Plain string content: the original templates of these families expect it.
        messages = [{"role": "user", "content": text}]
        if response is not None:
            messages.append({"role": "assistant", "content": response})
        return messages

    def _has_template(self, processor) -> bool:
        tokenizer = getattr(processor, "tokenizer", processor)
        if getattr(tokenizer, "chat_template", None):
            return True
        name = str(getattr(tokenizer, "name_or_path", "") or id(tokenizer))
        if name not in _warned_plain:
            _warned_plain.add(name)
            log.warning("%s has no chat template: using the plain prompt format %r (answer after one space, "
                        "EOS ends the turn)", name, PLAIN_PROMPT_FORMAT)
        return False

    def chat_prompt(self, processor, text: str, has_image: bool) -> str:
        if self._has_template(processor):
            return super().chat_prompt(processor, text, has_image)
        self._messages(text, has_image)  # refuses images
        bos = getattr(processor, "tokenizer", processor).bos_token or ""
        return bos + PLAIN_PROMPT_FORMAT.format(prompt=text)

    def chat_full(self, processor, text: str, has_image: bool, response: str) -> str:
        if self._has_template(processor):
            return super().chat_full(processor, text, has_image, response)
        return self.chat_prompt(processor, text, has_image) + " " + response + self.end_of_turn(processor)


class LlamaAdapter(CausalLMAdapter):
    model_type = "llama"


class MistralAdapter(CausalLMAdapter):
    model_type = "mistral"


class Qwen2Adapter(CausalLMAdapter):
    model_type = "qwen2"


class Gemma3TextAdapter(CausalLMAdapter):
    model_type = "gemma3_text"


_ADAPTERS: dict[str, type[FamilyAdapter]] = {
    cls.model_type: cls
    for cls in (LlavaAdapter, LlavaNextAdapter, Qwen2VLAdapter, Qwen2_5_VLAdapter, MllamaAdapter, Gemma3Adapter,
                Idefics3Adapter, LlamaAdapter, MistralAdapter, Qwen2Adapter, Gemma3TextAdapter)
}
SUPPORTED_FAMILIES: tuple[str, ...] = tuple(_ADAPTERS)
TEXT_ONLY_FAMILIES: tuple[str, ...] = tuple(name for name, cls in _ADAPTERS.items() if not cls.supports_images)


def get_adapter(config_or_model_type) -> FamilyAdapter:
    """The adapter for a config (or a model, or a model_type string)."""
    if isinstance(config_or_model_type, str):
        model_type, where = config_or_model_type, "the given model_type"
    else:
        config = getattr(unwrap_model(config_or_model_type), "config", config_or_model_type)
        model_type = getattr(config, "model_type", None)
        where = getattr(config, "_name_or_path", "") or type(config).__name__
    if model_type not in _ADAPTERS:
        raise ShieldError(f"unsupported model_type '{model_type}' in {where}; supported: "
                          f"{', '.join(SUPPORTED_FAMILIES)}")
    return _ADAPTERS[model_type]()
