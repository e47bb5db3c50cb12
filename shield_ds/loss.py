"""The training objective: cross-entropy over response tokens only."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def response_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample fp32 sum of cross-entropy over response tokens and the number of those tokens ([B], [B])."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    token_loss = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                                 ignore_index=-100, reduction="none").view(shift_labels.shape)
    return token_loss.sum(1), (shift_labels != -100).sum(1)


def response_window(labels: torch.Tensor) -> int:
    """How many trailing positions need logits for the response loss: with left padding every answer ends
    the row, so the window starts one position before the first answer column (the logit that predicts
    it). Passed as `logits_to_keep`, this skips the LM head on prompt tokens (most of a 262k-vocabulary
    model's head). Slice the labels with `labels[:, -window:]` to match."""
    answer_columns = (labels != -100).any(dim=0).nonzero()
    return labels.shape[1] - int(answer_columns[0]) + 1 if len(answer_columns) else 1


def response_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample mean cross-entropy over response tokens ([B]); 0 for a sample without any."""
    total, counts = response_nll(logits, labels)
    return total / counts.clamp_min(1)
