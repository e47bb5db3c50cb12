"""The shield patch: only the changed neuron slices, applied to a base checkpoint's files.

    python -m shield_ds.patch apply --base BASE_DIR --patch OUT/shield_patch.safetensors --out DIR
    python -m shield_ds.patch info --patch OUT/shield_patch.safetensors

A patch holds, per parameter that owns selected neurons, the final rows (gate/up) or columns
(down) at the neuron indices, plus metadata: the base model's config hash and a digest of the
base values at those slices, so a patch for another base model is refused, and the provenance of
the training data (the trained prompt keys, split, fraction, seed; `shield_ds.data.splits`).
Applying copies the base directory, rewrites only the weight shards that hold patched tensors
(every other byte of every other tensor is the base's) and writes `shield_provenance.json`. The
training recipe exports `OUT/model` with this same function, so `apply` reproduces it bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import dataclass
from typing import Any
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from shield_ds.errors import ShieldError
from shield_ds.process_group import ToolParser, exit_on_error
from shield_ds.io import atomic_dir, atomic_path
from shield_ds.data.splits import PROVENANCE_FILE, read_provenance, write_provenance
from shield_ds.models import config_hash, load_config

FORMAT = "shield_ds.patch"
VERSION = 1
_VISION = re.compile(r"vision|visual", re.IGNORECASE)


@dataclass
class PatchEntry:
    """One patched parameter: `values` are rows (kind "rows") or columns ("cols") at `indices`."""

    name: str  # the parameter's module path, e.g. model.language_model.layers.3.mlp.gate_proj.weight
    kind: str
    indices: torch.Tensor
    values: torch.Tensor


def layer_suffix(name: str) -> str:
    """`...layers.3.mlp.gate_proj.weight` -> `layers.3.mlp.gate_proj.weight` (stable across checkpoint layouts)."""
    match = re.search(r"(?:^|\.)(layers\.\d+\..+)$", name)
    if not match:
        raise ShieldError(f"parameter {name!r} is not inside a decoder layer")
    return match.group(1)


def take(tensor: torch.Tensor, kind: str, indices: torch.Tensor) -> torch.Tensor:
    """The slice of `tensor` a patch entry covers."""
    return tensor[indices] if kind == "rows" or tensor.dim() == 1 else tensor[:, indices]


def put(tensor: torch.Tensor, kind: str, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    out = tensor.clone()
    if kind == "rows" or tensor.dim() == 1:
        out[indices] = values.to(out.dtype)
    else:
        out[:, indices] = values.to(out.dtype)
    return out


# --- base checkpoint files -----------------------------------------------------------------------
def resolve_checkpoint_dir(path_or_name: str | Path) -> Path:
    """A local checkpoint directory, or the local hub-cache snapshot of a hub name."""
    path = Path(path_or_name)
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(path_or_name), local_files_only=True))
    except Exception:
        raise ShieldError(f"{path_or_name}: not a local checkpoint directory and not in the hub cache") from None


class CheckpointFiles:
    """The safetensors weight files of a Hugging Face checkpoint directory (sharded or not)."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        elif (self.dir / "model.safetensors").is_file():
            with safe_open(str(self.dir / "model.safetensors"), "pt") as f:
                weight_map = {k: "model.safetensors" for k in f.keys()}
        else:
            raise ShieldError(f"{self.dir}: no model.safetensors or model.safetensors.index.json (not a checkpoint directory)")
        self.weight_map: dict[str, str] = weight_map

    def key_for(self, param_name: str) -> str:
        """The checkpoint key of a language-model decoder parameter, whatever the file layout's prefix."""
        suffix = "." + layer_suffix(param_name)
        keys = [k for k in self.weight_map if ("." + k).endswith(suffix) and not _VISION.search(k)]
        if len(keys) != 1:
            raise ShieldError(f"{self.dir}: cannot find a unique checkpoint tensor for {param_name} "
                              f"(candidates: {keys[:4]})")
        return keys[0]

    def read(self, key: str) -> torch.Tensor:
        with safe_open(str(self.dir / self.weight_map[key]), "pt") as f:
            return f.get_tensor(key)


def base_digest(files: CheckpointFiles, entries: list[tuple[str, str, torch.Tensor]]) -> str:
    """sha256 over the base values (as stored) of every patched slice."""
    digest = hashlib.sha256()
    for name, kind, indices in sorted(entries, key=lambda e: e[0]):
        values = take(files.read(files.key_for(name)), kind, indices).contiguous()
        digest.update(name.encode())
        digest.update(values.view(torch.uint8).numpy().tobytes() if values.numel() else b"")
    return digest.hexdigest()


# --- writing and reading patches -----------------------------------------------------------------
def write_patch(path: str | Path, entries: list[PatchEntry], *, base_dir: str | Path, config_hash: str,
                extra_meta: dict | None = None) -> None:
    """Write the patch file atomically (the base directory is read for the digest and dtypes)."""
    files = CheckpointFiles(base_dir)
    tensors, params = {}, {}
    for i, entry in enumerate(sorted(entries, key=lambda e: e.name)):
        dtype = files.read(files.key_for(entry.name)).dtype
        tensors[f"p{i}.values"] = entry.values.detach().to("cpu", dtype).contiguous()
        tensors[f"p{i}.indices"] = entry.indices.to(torch.int64).contiguous()
        params[f"p{i}"] = {"name": entry.name, "kind": entry.kind}
    meta = {"format": FORMAT, "version": VERSION, "base_config_hash": config_hash, "params": params,
            "base_digest": base_digest(files, [(e.name, e.kind, e.indices) for e in entries]), **(extra_meta or {})}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"shield_ds": json.dumps(meta, sort_keys=True)})


def read_patch(path: str | Path) -> tuple[list[PatchEntry], dict]:
    path = Path(path)
    if not path.is_file():
        raise ShieldError(f"{path}: patch file not found")
    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {}).get("shield_ds", "{}"))
        tensors = load_file(str(path))
    except Exception as exc:  # corrupt files raise several types
        raise ShieldError(f"{path}: unreadable patch file ({exc})") from None
    if meta.get("format") != FORMAT:
        raise ShieldError(f"{path}: not a shield-ds patch")
    entries = [PatchEntry(p["name"], p["kind"], tensors[f"{key}.indices"], tensors[f"{key}.values"])
               for key, p in sorted(meta["params"].items(), key=lambda kv: int(kv[0][1:]))]
    return entries, meta


# --- applying ------------------------------------------------------------------------------------
def apply_patch(base_dir: str | Path, patch: str | Path, out_dir: str | Path) -> Path:
    """Write `out_dir` = base checkpoint with the patch's slices; refuses a patch for another base."""
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    entries, meta = read_patch(patch)
    provenance = meta.get("provenance")
    if provenance:  # a base that was itself trained: the result was trained on both sets of prompts
        base_provenance = read_provenance(base_dir)
        if base_provenance:
            provenance = {**provenance, "prompt_keys": sorted(set(provenance["prompt_keys"])
                                                              | set(base_provenance["trained_prompt_keys"]))}
    files = CheckpointFiles(base_dir)
    base_hash = config_hash(load_config(base_dir))
    if base_hash != meta["base_config_hash"]:
        raise ShieldError(f"{patch}: made for another base model (config hash {meta['base_config_hash'][:12]} "
                          f"!= {base_hash[:12]} of {base_dir})")
    if base_digest(files, [(e.name, e.kind, e.indices) for e in entries]) != meta["base_digest"]:
        raise ShieldError(f"{patch}: made for another base model ({base_dir} holds other weights at the patched slices)")
    by_file: dict[str, list[tuple[str, PatchEntry]]] = {}
    for entry in entries:
        key = files.key_for(entry.name)
        by_file.setdefault(files.weight_map[key], []).append((key, entry))

    def updates():
        for filename, patched in by_file.items():
            yield filename, lambda base, patched=patched: {
                key: put(base[key], entry.kind, entry.indices, entry.values) for key, entry in patched}

    return rewrite_checkpoint(base_dir, out_dir, updates(), provenance=provenance)


def rewrite_checkpoint(base_dir: str | Path, out_dir: str | Path, updates,
                       provenance: dict[str, Any] | None = None) -> Path:
    """Write `out_dir` = a copy of the checkpoint `base_dir` with some tensors replaced, atomically.

    `updates` yields (weight file name, fn): fn gets that file's base tensors ({key: tensor}) and
    returns the replacements ({key: tensor}, cast to the stored dtype). Files never named are
    copied byte for byte; a rewritten file keeps its metadata and every other tensor's values. The
    updates are consumed one file at a time (so a producer can gather parameters file by file).
    `provenance` (`splits.trained_provenance`) replaces the base's provenance file.
    """
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    with atomic_dir(out_dir) as staging:
        written = set()
        for filename, replace in updates:
            with safe_open(str(base_dir / filename), "pt") as f:
                file_meta = f.metadata()
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            for key, value in replace(tensors).items():
                if key not in tensors:
                    raise ShieldError(f"{base_dir / filename}: no tensor {key!r} to replace")
                tensors[key] = value.detach().to("cpu", tensors[key].dtype).contiguous()
            save_file(tensors, str(staging / filename), metadata=file_meta)
            written.add(filename)
        for item in base_dir.iterdir():
            if item.name in written or item.name.startswith(".") or (provenance and item.name == PROVENANCE_FILE):
                continue
            (shutil.copytree if item.is_dir() else shutil.copy2)(item, staging / item.name)
        if provenance:
            write_provenance(staging, provenance)
    return out_dir


@exit_on_error
def main(argv: list[str] | None = None) -> None:
    parser = ToolParser(prog="python -m shield_ds.patch", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    apply = sub.add_parser("apply", help="apply a patch to a base checkpoint directory")
    apply.add_argument("--base", required=True)
    apply.add_argument("--patch", required=True)
    apply.add_argument("--out", required=True)
    info = sub.add_parser("info", help="print a patch's metadata")
    info.add_argument("--patch", required=True)
    args = parser.parse_args(argv)
    if args.command == "apply":
        print(apply_patch(args.base, args.patch, args.out))
    else:
        entries, meta = read_patch(args.patch)
        meta = {k: v for k, v in meta.items() if k != "params"}
        if meta.get("provenance"):
            keys = meta["provenance"].pop("prompt_keys")
            meta["provenance"]["trained_prompt_keys"] = len(keys)
        meta["patched_parameters"] = len(entries)
        meta["patched_values"] = sum(e.values.numel() for e in entries)
        print(json.dumps(meta, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
