"""Import a GGUF file (llama.cpp's format) as a normal Hugging Face checkpoint.

    python -m shield_ds.models.convert --gguf SmolLM2-135M-Instruct.Q4_1.gguf --out runs/models/smollm2
    python -m shield_ds.models.convert --gguf base.gguf --out DIR --dtype bfloat16 --chat-template chat.jinja

Writes config.json, model.safetensors (de-quantized), generation_config.json and the tokenizer files
(with chat_template.jinja when the file, or --chat-template, has a template) to DIR, atomically: a
temporary directory beside DIR is renamed into place at the end. Only decoder-only families that
shield-ds supports are accepted (llama, mistral, qwen2, gemma3_text). Needs the `gguf` package
(the optional extra `gguf`).

transformers marks a GGUF-loaded model as quantized and refuses `save_pretrained`; the weights are
therefore de-quantized on load, and a model rebuilt from the config takes their state dict.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from shield_ds.dist import get_logger
from shield_ds.errors import ShieldError, first_line
from shield_ds.process_group import ToolParser, exit_on_error
from shield_ds.io import atomic_dir

from .adapters import TEXT_ONLY_FAMILIES

log = get_logger("models.convert")

GGUF_MAGIC = b"GGUF"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def check_gguf(path: Path) -> None:
    """ShieldError unless `path` is a readable file starting with the GGUF magic."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise ShieldError(f"cannot read GGUF file {path}: {exc.strerror or first_line(exc)}") from exc
    if magic != GGUF_MAGIC:
        raise ShieldError(f"{path} is not a GGUF file (it does not start with {GGUF_MAGIC.decode()})")


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ShieldError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ShieldError(f"--out {out} exists and is not empty; use --overwrite or another --out")


def _read_chat_template(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ShieldError(f"cannot read --chat-template {path}: {first_line(exc)}") from exc
    if not text.strip():
        raise ShieldError(f"--chat-template {path} is empty")
    return text


def load_gguf(gguf: Path):
    """(config, tokenizer, de-quantized model in float32) from a GGUF file of a supported family."""
    try:
        import gguf as _gguf  # noqa: F401  (transformers' GGUF reader needs it)
    except ImportError as exc:
        raise ShieldError("reading GGUF files needs the `gguf` package: pip install 'shield-ds[gguf]' "
                          "(or pip install gguf)") from exc
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, name = str(gguf.parent), gguf.name
    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
    except Exception as exc:  # transformers raises ValueError, KeyError, struct errors ... on bad files
        raise ShieldError(f"cannot read {gguf} as GGUF: {first_line(exc)}") from exc
    model_type = getattr(config, "model_type", None)
    if model_type not in TEXT_ONLY_FAMILIES:
        raise ShieldError(f"{gguf}: unsupported architecture '{model_type}'; supported: "
                          f"{', '.join(TEXT_ONLY_FAMILIES)}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32,
                                                     quantization_config=GgufConfig(dequantize=True))
    except Exception as exc:
        raise ShieldError(f"cannot load {gguf}: {first_line(exc)}") from exc
    return config, tokenizer, model


def rebuild(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A plain (not quantized) copy of a GGUF-loaded model: same class and config, same weights."""
    from transformers import AutoModelForCausalLM

    config = model.config.__class__.from_dict(model.config.to_dict())
    for key in ("quantization_config", "_model_name_or_path"):
        if hasattr(config, key):
            delattr(config, key)
    config.name_or_path = ""
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = model.state_dict()
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    tied = set(getattr(fresh, "_tied_weights_keys", None) or {}) if config.tie_word_embeddings else set()
    missing = [key for key in missing if key not in tied]
    if missing or unexpected:
        raise ShieldError(f"GGUF weights do not fit {type(fresh).__name__}: missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}")
    if config.tie_word_embeddings:
        fresh.tie_weights()
    return fresh.to(dtype).eval()


def convert_gguf(gguf: str | Path, out: str | Path, *, dtype: str = "float32", overwrite: bool = False,
                 chat_template: str | Path | None = None) -> Path:
    """Convert `gguf` into a Hugging Face checkpoint directory `out`; returns `out`.

    Every input check runs before anything is written; a failure leaves `out` as it was.
    """
    gguf, out = Path(gguf), Path(out)
    if dtype not in DTYPES:
        raise ShieldError(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    _check_out(out, overwrite)
    template = _read_chat_template(Path(chat_template)) if chat_template is not None else None
    check_gguf(gguf)
    config, tokenizer, model = load_gguf(gguf)
    if template is not None:
        tokenizer.chat_template = template
        try:
            tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                          tokenize=False)
        except Exception as exc:  # jinja2 TemplateError and friends
            raise ShieldError(f"--chat-template {chat_template} does not render: {first_line(exc)}") from exc
    fresh = rebuild(model, DTYPES[dtype])
    del model
    with atomic_dir(out, overwrite=True) as stage:
        fresh.save_pretrained(stage)
        tokenizer.save_pretrained(stage)
    note = "" if getattr(tokenizer, "chat_template", None) else " (no chat template: the plain prompt format applies)"
    log.info("converted %s (%s, %s) to %s%s", gguf, config.model_type, dtype, out, note)
    return out


@exit_on_error
def main(argv: list[str] | None = None) -> None:
    parser = ToolParser(prog="python -m shield_ds.models.convert", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", required=True, type=Path, help="the .gguf file")
    parser.add_argument("--out", required=True, type=Path, help="checkpoint directory to write")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES))
    parser.add_argument("--chat-template", type=Path, default=None,
                        help="a Jinja chat template file to store with the tokenizer (replaces the file's own)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    args = parser.parse_args(argv)
    out = convert_gguf(args.gguf, args.out, dtype=args.dtype, overwrite=args.overwrite,
                       chat_template=args.chat_template)
    print(json.dumps({"out": str(out)}))


if __name__ == "__main__":
    main()
