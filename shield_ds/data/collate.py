"""Collation: records -> padded model inputs, with the masks that statistics and training need."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shield_ds.data.images import load_image
from shield_ds.data.records import SafetyRecord
from shield_ds.errors import ShieldError

IGNORE_INDEX = -100
# Processor outputs laid out per token ([B, T, ...]); everything else (pixel values, grids) is per image.
SEQUENCE_KEYS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids", "cross_attention_mask",
                 "position_ids")


@dataclass
class Batch:
    """One collated batch.

    prompt_mask: bool [B, T], the prompt tokens that are neither padding nor image tokens.
    labels: [B, T] token ids on response tokens, -100 elsewhere (training only, else None).
    weights: float [B]; 0.0 marks filler samples whose statistics and loss must be discarded.
    """

    inputs: dict[str, torch.Tensor]
    prompt_mask: torch.Tensor
    labels: torch.Tensor | None
    weights: torch.Tensor
    records: list[SafetyRecord]

    def to(self, device: torch.device | str, float_dtype: torch.dtype | None = None) -> "Batch":
        """Move every tensor to `device`; floating inputs (pixel values) are cast to `float_dtype` if given."""
        def move(t: torch.Tensor) -> torch.Tensor:
            if float_dtype is not None and t.is_floating_point():
                return t.to(device=device, dtype=float_dtype)
            return t.to(device)

        return Batch(inputs={k: move(v) for k, v in self.inputs.items()}, prompt_mask=self.prompt_mask.to(device),
                     labels=None if self.labels is None else self.labels.to(device),
                     weights=self.weights.to(device), records=self.records)


class SafetyCollator:
    """Turn a list of records into a `Batch` through the family's chat template and processor.

    Left padding. A batch is all-image or all-text (see `plan_batches`). With `train=True` each record
    needs a `response`, and the labels cover exactly the response tokens. `max_length` cuts the
    response tail of training sequences; a prompt longer than `max_length` is a ShieldError.
    `include_image_tokens=True` keeps image tokens in `prompt_mask`.
    """

    def __init__(self, processor, adapter, *, train: bool = False, max_length: int | None = None,
                 include_image_tokens: bool = False, image_size: int = 512):
        self.processor = processor
        self.adapter = adapter
        self.train = train
        self.max_length = max_length
        self.include_image_tokens = include_image_tokens
        self.image_size = image_size
        self.image_token_ids = torch.tensor(adapter.image_token_ids(processor), dtype=torch.long)
        tokenizer = getattr(processor, "tokenizer", processor)
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def __call__(self, records: list[SafetyRecord], weights: list[float] | None = None) -> Batch:
        if not records:
            raise ValueError("SafetyCollator: empty batch")
        kinds = {record.has_image for record in records}
        if len(kinds) > 1:
            raise ValueError("SafetyCollator: a batch mixes image and text-only records (use plan_batches)")
        has_image = kinds.pop()
        if weights is None:
            weights = [1.0] * len(records)
        if len(weights) != len(records):
            raise ValueError(f"SafetyCollator: {len(records)} records but {len(weights)} weights")
        if self.train:
            for record in records:
                if record.response is None:
                    raise ShieldError(f"record {record.id} has no response (training needs one on every record)")

        images = [load_image(record, self.image_size) for record in records] if has_image else None
        prompts = [self.adapter.chat_prompt(self.processor, r.prompt, has_image) for r in records]
        prompt_inputs = self.adapter.processor_inputs(self.processor, prompts, images, padding_side="left")
        if self.train:
            # A cut-off answer (`response_open`) gets no end of turn: the model must not learn to stop there.
            texts = [self._full_text(r, has_image) for r in records]
            inputs = self.adapter.processor_inputs(self.processor, texts, images, padding_side="left")
        else:
            inputs = prompt_inputs

        attention = inputs["attention_mask"].bool()
        lengths = attention.sum(dim=1)
        prompt_lengths = self._prompt_lengths(prompt_inputs, inputs) if self.train else lengths

        for i, record in enumerate(records):
            if self.max_length is not None and int(prompt_lengths[i]) > self.max_length:
                raise ShieldError(f"record {record.id}: prompt is {int(prompt_lengths[i])} tokens, "
                                  f"longer than max_length {self.max_length}")
        if self.max_length is not None and int(lengths.max()) > self.max_length:
            inputs = self._truncate(inputs, lengths, self.max_length)
            attention = inputs["attention_mask"].bool()
            lengths = attention.sum(dim=1)

        input_ids = inputs["input_ids"]
        seq_len = input_ids.shape[1]
        # With left padding row i's tokens sit in columns [T - length_i, T).
        position = torch.arange(seq_len).unsqueeze(0)
        start = (seq_len - lengths).unsqueeze(1)
        in_prompt = attention & (position < start + prompt_lengths.unsqueeze(1))
        is_image = torch.isin(input_ids, self.image_token_ids)
        prompt_mask = in_prompt if self.include_image_tokens else in_prompt & ~is_image

        labels = None
        if self.train:
            response = attention & ~in_prompt & ~is_image
            labels = torch.where(response, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
        return Batch(inputs=inputs, prompt_mask=prompt_mask, labels=labels,
                     weights=torch.tensor(weights, dtype=torch.float32), records=list(records))

    def _full_text(self, record: SafetyRecord, has_image: bool) -> str:
        """The chat with the record's response; for `response_open` cut right after the response."""
        full = self.adapter.chat_full(self.processor, record.prompt, has_image, record.response)
        if not record.response_open:
            return full
        end = full.rfind(record.response)
        if end < 0:
            raise ShieldError(f"record {record.id}: the chat template changed the response text")
        return full[:end + len(record.response)]

    @staticmethod
    def _prompt_lengths(prompt_inputs: dict, full_inputs: dict) -> torch.Tensor:
        """Per row, the number of leading tokens of the full sequence that belong to the prompt.

        The prompt is an exact text prefix of the full sequence, but a tokenizer may merge across the
        boundary; the longest common token prefix is then the prompt (the merged token is not trained).
        """
        prompt_ids, full_ids = prompt_inputs["input_ids"], full_inputs["input_ids"]
        prompt_len = prompt_inputs["attention_mask"].sum(dim=1)
        full_len = full_inputs["attention_mask"].sum(dim=1)
        result = []
        for i in range(prompt_ids.shape[0]):
            p = prompt_ids[i, prompt_ids.shape[1] - int(prompt_len[i]):]
            f = full_ids[i, full_ids.shape[1] - int(full_len[i]):]
            n = min(len(p), len(f))
            same = (p[:n] == f[:n]).long()
            result.append(int(same.cumprod(0).sum()))
        return torch.tensor(result, dtype=torch.long)

    def _truncate(self, inputs: dict, lengths: torch.Tensor, max_length: int) -> dict:
        """Keep the first `max_length` tokens of every row (cutting response tails), re-padded on the left."""
        batch, seq_len = inputs["input_ids"].shape
        keep = lengths.clamp(max=max_length)
        new_len = int(keep.max())
        out = dict(inputs)
        for key in SEQUENCE_KEYS:
            tensor = inputs.get(key)
            if tensor is None or tensor.dim() < 2 or tuple(tensor.shape[:2]) != (batch, seq_len):
                continue
            fill = self.pad_token_id if key == "input_ids" else 0
            new = torch.full((batch, new_len, *tensor.shape[2:]), fill, dtype=tensor.dtype)
            for i in range(batch):
                begin, k = seq_len - int(lengths[i]), int(keep[i])
                new[i, new_len - k:] = tensor[i, begin:begin + k]
            out[key] = new
        return out
