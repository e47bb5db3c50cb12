"""Load a model judge (`GuardJudge` or `ClassifierJudge`) from a local directory or a hub id: the factory sits
above the judge classes, which import only their base (`judges.ModelJudge`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from shield_ds.dist import get_logger
from shield_ds.errors import ShieldError, first_line
from shield_ds.evaluate.classifier_judge import ClassifierJudge
from shield_ds.evaluate.guard_judge import GuardJudge
from shield_ds.evaluate.judges import ModelJudge

log = get_logger("evaluate.judges")


def _looks_like_path(name: str) -> bool:
    """Local-path spellings that a hub id (`org/name`) can never have."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name or Path(name).exists()



def load_judge(path_or_name: str | Path, *, kind: str = "auto", device: str | None = None,
               dtype: str = "auto", **kwargs: Any) -> ModelJudge:
    """Load a judge from a local directory or a hub id: a `GuardJudge` (kind "guard", a causal LM) or a
    `ClassifierJudge` (kind "classifier"); kind "auto" picks by the architecture. `kwargs` go to the
    judge's constructor."""
    name = str(path_or_name)
    if kind not in ("auto", "guard", "classifier"):
        raise ShieldError(f"judge {name}: kind must be 'auto', 'guard' or 'classifier', not {kind!r}")
    if _looks_like_path(name) and not Path(name).expanduser().is_dir():
        what = "not a model directory" if Path(name).expanduser().exists() else "no such directory"
        raise ShieldError(f"judge model {name}: {what}")
    source = str(Path(name).expanduser()) if Path(name).expanduser().is_dir() else name
    try:
        config = AutoConfig.from_pretrained(source)
    except Exception as exc:
        raise ShieldError(f"judge model {name}: cannot load its config ({first_line(exc)})") from None
    if kind == "auto":
        archs = config.architectures or []
        if any(a.endswith("ForSequenceClassification") for a in archs):
            kind = "classifier"
        elif any(a.endswith(("ForCausalLM", "ForConditionalGeneration")) for a in archs):
            kind = "guard"
        else:
            raise ShieldError(f"judge model {name}: cannot tell its kind from architectures {archs}; "
                              "pass kind='guard' or kind='classifier'")
    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    loader = AutoModelForSequenceClassification if kind == "classifier" else AutoModelForCausalLM
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = loader.from_pretrained(source, dtype=torch_dtype)
    except Exception as exc:
        raise ShieldError(f"judge model {name}: cannot load it as a {kind} ({first_line(exc)})") from None
    log.info("judge %s loaded as %s", name, kind)
    judge_class = ClassifierJudge if kind == "classifier" else GuardJudge
    return judge_class(model, tokenizer, name=name, device=device, **kwargs)
