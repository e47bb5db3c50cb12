"""Stage 1: find safety neurons from all-reduced activation statistics (the `Identifier` recipe)."""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file

import shield_ds
from shield_ds import dist
from shield_ds.config import LATER_DATA_OPTIONS, DataConfig, InferenceConfig, option
from shield_ds.engine import ShieldEngine, resolve_ds_config
from shield_ds.zero_internals import gathered
from shield_ds.data.records import language_group, modality_group
from shield_ds.errors import ShieldError
from shield_ds.io import atomic_dir
from shield_ds.neurons.neuron_set import META_FILE, NORMS_KEY, SETS_DIR, STATS_FILE, NeuronSet
from shield_ds.neurons.scores import compute_scores
from shield_ds.neurons.selection import cap_by_param_fraction, cap_neurons, param_fraction, select_per_layer
from shield_ds.neurons.statistics import ActivationStatistics
from shield_ds.data import SafetyCollator, plan_batches, shard_batches
from shield_ds.models import config_hash, count_parameters, get_adapter, load_config

log = dist.get_logger("identify")

# Settings that must match for an existing output directory to be reused without --overwrite.
SIGNATURE_KEYS = ("config_hash", "score", "ratio", "max_param_fraction", "cap_ranking", "tokens", "languages",
                  "modalities", "harmful_sources", "benign_sources", "per_group_limit", "seed", "include_image_tokens",
                  "scope", "benign_per_group_limit", "split", "test_fraction", "validation_fraction", "split_seed",
                  "benign_mix")
# The settings that only choose among neurons: `--from-stats` may change these and nothing else.
SELECTION_KEYS = ("score", "ratio", "max_param_fraction", "cap_ranking")
# Fields of a neuron set's metadata that describe that set, not the statistics it was selected from.
_SET_FIELDS = ("param_fraction", "harmful_groups", "benign_groups", "restricted_to", "selected_neurons", "per_layer",
               "format_version")


@dataclass
class IdentifyConfig(DataConfig, InferenceConfig):
    """Stage 1's options (with the shared data and engine options)."""

    score: Literal["saliency", "contrast", "frequency"] = option("saliency", "neuron score (neurons/scores.py)")
    ratio: float = option(0.01, "per-layer top fraction of neurons")
    max_param_fraction: float = option(0.0003, "cap on selected parameters / all parameters (0 disables)")
    cap_ranking: Literal["layer-normalized", "raw"] = option(
        "layer-normalized", "how the parameter cap ranks candidates across layers: by within-layer rank (keeps the "
        "per-layer spread) or by raw score (favours deep layers)")
    tokens: Literal["all", "last"] = option("all", "prompt tokens the statistics reduce over")
    scope: Literal["lm", "lm+vision"] = option("lm", "lm+vision: also find neurons in the vision tower's MLPs "
                                               "(written to OUT/vision/)")
    include_image_tokens: bool = option(False, "also count image-placeholder tokens")
    batch_size: int = option(8, "records per forward pass per rank")
    out: str = option("runs/identify", "output directory")
    offload_params: bool = option(False, "ZeRO-3 parameter offload to CPU")
    overwrite: bool = option(False, "replace an output directory from another model/configuration")
    from_stats: str | None = option(
        None, "select again from a finished identify output's statistics, without forward passes (seconds, any "
        "number of processes): --score, --ratio, --max-param-fraction and --cap-ranking may differ from it; the "
        "model, data and token options must be the same")


def last_token_mask(prompt_mask: torch.Tensor) -> torch.Tensor:
    """Keep only the last counted token of each sample."""
    positions = torch.arange(prompt_mask.shape[1], device=prompt_mask.device).expand_as(prompt_mask)
    last = torch.where(prompt_mask, positions, torch.full_like(positions, -1)).max(dim=1).values
    out = torch.zeros_like(prompt_mask)
    rows = torch.nonzero(last >= 0).squeeze(1)
    out[rows, last[rows]] = True
    return out


def down_column_norms(model: torch.nn.Module, adapter) -> torch.Tensor:
    """||W_down[:, i]||_2 per layer and neuron, float64 [layers, width]; gathers one layer at a time."""
    norms = []
    for layer in adapter.decoder_layers(model):
        weight = adapter.ffn(layer).down.weight
        with gathered(weight):
            norms.append(weight.detach().to(torch.float64).norm(dim=0).cpu())
    return torch.stack(norms)


def load_identify_records(cfg: IdentifyConfig) -> list:
    """Harmful and benign records with the requested languages and modality views (both required)."""
    return cfg.load_records(require=("harmful", "benign"))


def signature_differences(old: dict[str, Any], signature: dict[str, Any]) -> list[str]:
    """The SIGNATURE_KEYS whose recorded value differs from `signature`'s (an output written before a key
    existed counts as having its LATER_DATA_OPTIONS value)."""
    return [k for k in SIGNATURE_KEYS if old.get(k, LATER_DATA_OPTIONS.get(k)) != signature.get(k)]


def check_output_dir(out: Path, signature: dict[str, Any], overwrite: bool) -> None:
    """Refuse to replace an output directory written for another model or configuration."""
    if overwrite or not out.exists():
        return
    meta_path = out / META_FILE
    if not meta_path.is_file():
        if any(out.iterdir()):
            raise ShieldError(f"{out}: exists and is not an identify output directory (use --overwrite)")
        return
    try:
        old = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        raise ShieldError(f"{meta_path}: unreadable; refusing to replace {out} (use --overwrite)") from None
    diffs = signature_differences(old, signature)
    if diffs:
        what = "another model" if "config_hash" in diffs else "another configuration (" + ", ".join(diffs) + ")"
        raise ShieldError(f"{out}: holds neurons identified for {what}; use --overwrite or another --out")


class Identifier:
    """Runs the forward passes, reduces the statistics, selects neurons and writes the outputs."""

    def __init__(self, cfg: IdentifyConfig):
        if not 0 < cfg.ratio <= 1:
            raise ShieldError(f"--ratio must be in (0, 1], not {cfg.ratio}")
        if cfg.from_stats and Path(cfg.out).resolve() == Path(cfg.from_stats).resolve():
            raise ShieldError(f"--from-stats {cfg.from_stats}: --out must be another directory (the statistics "
                              "are read from it)")
        self.cfg = cfg

    def signature(self, config_hash: str) -> dict[str, Any]:
        c = self.cfg
        return {"config_hash": config_hash, "score": c.score, "ratio": c.ratio, "max_param_fraction": c.max_param_fraction,
                "cap_ranking": c.cap_ranking, "tokens": c.tokens, "languages": c.languages, "modalities": c.modalities,
                "harmful_sources": c.harmful, "benign_sources": c.benign, "per_group_limit": c.per_group_limit,
                "benign_per_group_limit": c.benign_per_group_limit, "benign_mix": c.benign_mix, "seed": c.seed,
                "include_image_tokens": c.include_image_tokens, "scope": c.scope, **c.split_spec.fields()}

    def run(self) -> NeuronSet:
        cfg = self.cfg
        out = Path(cfg.out)
        # Everything that can be wrong with the input is checked before the model is loaded.
        config = load_config(cfg.model)
        adapter = get_adapter(config)
        adapter.check_modalities(cfg.modalities)
        chash = config_hash(config)
        signature = self.signature(chash)
        check_output_dir(out, signature, cfg.overwrite)
        if cfg.from_stats:
            return self.reselect(signature)
        records = load_identify_records(cfg)

        ds_config = None
        if cfg.ds_config is not None:
            overrides = list(cfg.ds_overrides)
            if cfg.offload_params:
                overrides.append('zero_optimization.offload_param.device="cpu"')
            ds_config = resolve_ds_config(cfg.ds_config, micro_batch_size=cfg.batch_size, overrides=overrides)
        # Either way every rank runs its shard of the batches and the statistics are all-reduced.
        inference = ShieldEngine.load(cfg.model, ds_config, mode="infer", zero=cfg.zero)
        loaded, model, device, dtype = inference.loaded, inference.module, inference.device, inference.dtype

        num_layers = adapter.num_layers(config)
        width = adapter.intermediate_size(config)
        groups = sorted({r.group for r in records})
        stats = ActivationStatistics(groups, num_layers, width, device=device)
        stats.attach([adapter.neuron_module(layer) for layer in adapter.decoder_layers(model)])
        vision = VisionScope(adapter, model, groups, device) if cfg.scope == "lm+vision" else None

        batches = plan_batches(records, cfg.batch_size)
        steps = shard_batches(batches, dist.rank(), dist.world_size())
        collator = SafetyCollator(loaded.processor, adapter, include_image_tokens=cfg.include_image_tokens)

        with contextlib.ExitStack() as stack:
            staging = stack.enter_context(atomic_dir(out)) if dist.is_rank0() else None
            writer = dist.Rank0Writer(staging / "tb" if staging else None)
            stack.callback(writer.close)
            started = time.perf_counter()
            self._forward_all(model, device, dtype, collator, stats, steps, writer, vision)
            forward_seconds = round(time.perf_counter() - started, 3)
            stats.detach()
            stats.all_reduce()
            stats.to_cpu()  # the accumulators live on the GPU under NCCL; the norms below are on the CPU
            col_norms = down_column_norms(model, adapter)
            total_params = count_parameters(model)
            per_neuron = adapter.param_count_per_neuron(config)
            meta = {
                "model": str(cfg.model), "model_type": config.model_type, "num_layers": num_layers,
                "hidden_size": adapter.hidden_size(config), "intermediate_size": width,
                "total_params": total_params, "params_per_neuron": per_neuron,
                "groups": {g: {"records": sum(1 for r in records if r.group == g), "tokens": n}
                           for g, n in stats.token_counts().items()},
                "world_size": dist.world_size(), "threads": dist.thread_choice(), "forward_seconds": forward_seconds,
                "zero": inference.zero, "package_version": shield_ds.__version__,
                "dtype": str(dtype).replace("torch.", ""), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                **cfg.split_spec.provenance(records), **signature,
                "config": asdict(cfg),
            }
            neuron_set = self._select(stats, groups, col_norms, meta, None)
            vision_set = vision.finish(self, meta) if vision is not None else None
            if staging is not None:
                self._write(staging, stats, groups, col_norms, meta, neuron_set)
                if vision_set is not None:
                    vision_set.save(staging / VISION_DIR)
                    save_file(vision.stats.state_dict(), str(staging / VISION_DIR / STATS_FILE),
                              metadata={"format": "shield_ds.stats"})
                self._report(neuron_set, writer)
        dist.barrier()
        return neuron_set

    @torch.no_grad()
    def _forward_all(self, model, device, dtype, collator, stats, steps, writer, vision=None) -> None:
        start, done = time.perf_counter(), 0
        bar = dist.progress(steps, desc="identify", unit="batch")
        for step, (batch_records, weight) in enumerate(bar):
            batch = collator(batch_records, [weight] * len(batch_records))
            mask = batch.prompt_mask.to(device)
            if self.cfg.tokens == "last":
                mask = last_token_mask(mask)
            sample_groups = [r.group if weight > 0 else None for r in batch_records]
            stats.set_batch(mask, sample_groups)
            if vision is not None:
                vision.stats.set_batch_rows(sample_groups)
            inputs = {k: (v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device))
                      for k, v in batch.inputs.items()}
            model(**inputs, use_cache=False, logits_to_keep=1)  # the statistics need no vocabulary logits
            stats.clear_batch()
            if vision is not None:
                vision.stats.clear_batch()
            done += len(batch_records) if weight > 0 else 0
            rate = done * dist.world_size() / max(time.perf_counter() - start, 1e-9)
            writer.scalar("identify/records_per_s", rate, step)
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(records_s=f"{rate:.1f}")

    def _select(self, stats: ActivationStatistics, groups: list[str], col_norms: torch.Tensor, meta: dict,
                restrict: tuple[str, str] | None, cap: bool = True) -> NeuronSet:
        """Select from the pooled harmful vs benign groups; `restrict` = ("language"|"modality", value)."""
        cfg = self.cfg

        def parts(group: str) -> dict[str, str]:
            label, language, modality = group.split(".")
            return {"label": label, "language": language, "modality": modality}

        harmful = [g for g in groups if parts(g)["label"] == "harmful"]
        benign = [g for g in groups if parts(g)["label"] == "benign"]
        if restrict is not None:
            key, value = restrict
            harmful = [g for g in harmful if parts(g)[key] == value]
            same = [g for g in benign if parts(g)[key] == value]
            benign = same or benign
        h_score, b_score = compute_scores(cfg.score, stats.pooled(harmful), stats.pooled(benign), col_norms)
        selected = select_per_layer(h_score, b_score, cfg.ratio)
        if cap:
            selected = cap_by_param_fraction(selected, h_score, meta["params_per_neuron"], meta["total_params"],
                                             cfg.max_param_fraction, ranking=cfg.cap_ranking)
        set_meta = dict(meta)
        set_meta["param_fraction"] = param_fraction(selected, meta["params_per_neuron"], meta["total_params"])
        set_meta["harmful_groups"], set_meta["benign_groups"] = harmful, benign
        if restrict is not None:
            set_meta["restricted_to"] = {restrict[0]: restrict[1]}
        return NeuronSet(selected, set_meta)

    def _write(self, staging: Path, stats, groups, col_norms, meta, neuron_set: NeuronSet) -> None:
        neuron_set.save(staging)
        save_file({**stats.state_dict(), NORMS_KEY: col_norms.contiguous()}, str(staging / STATS_FILE),
                  metadata={"format": "shield_ds.stats"})
        harmful = [g.split(".") for g in groups if g.startswith("harmful.")]
        for key, pos in (("language", 1), ("modality", 2)):
            for value in sorted({parts[pos] for parts in harmful}):
                sub = self._select(stats, groups, col_norms, meta, (key, value))
                sub.save(staging / SETS_DIR / (language_group(value) if key == "language" else modality_group(value)))

    def reselect(self, signature: dict[str, Any]) -> NeuronSet:
        """`--from-stats DIR`: the selection of `run` on DIR's saved statistics and column norms (no model
        forward); every rank computes the same set, rank 0 writes it."""
        from safetensors.torch import load_file

        cfg, source, out = self.cfg, Path(self.cfg.from_stats), Path(self.cfg.out)
        where = f"--from-stats {source}"
        if cfg.scope != "lm":
            raise ShieldError(f"{where}: --scope {cfg.scope} needs forward passes (re-selection covers the language model)")
        if not (source / STATS_FILE).is_file():
            raise ShieldError(f"{where}: no {STATS_FILE} (not an identify output directory)")
        old = NeuronSet.load(source).meta
        diffs = [k for k in signature_differences(old, signature) if k not in SELECTION_KEYS]
        if diffs:
            first = diffs[0]
            raise ShieldError(f"{where}: its statistics were collected with other {', '.join(diffs)} "
                              f"({first}={old.get(first)!r} there, {signature.get(first)!r} here); only "
                              f"{', '.join('--' + k.replace('_', '-') for k in SELECTION_KEYS)} may differ")
        try:
            tensors = load_file(str(source / STATS_FILE))
        except Exception as exc:  # safetensors raises several types for corrupt files
            raise ShieldError(f"{source / STATS_FILE}: unreadable ({exc})") from None
        if NORMS_KEY not in tensors:
            raise ShieldError(f"{source / STATS_FILE}: no {NORMS_KEY} (written by an identify before re-selection "
                              "existed); run identify there again")
        col_norms = tensors.pop(NORMS_KEY)
        try:
            stats = ActivationStatistics.from_state_dict(tensors)
        except ValueError as exc:
            raise ShieldError(f"{source / STATS_FILE}: {exc}") from None
        meta = {k: v for k, v in old.items() if k not in _SET_FIELDS}
        meta.update(signature, config=asdict(cfg), created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    package_version=shield_ds.__version__, selected_from=str(source))
        neuron_set = self._select(stats, stats.groups, col_norms, meta, None)
        if dist.is_rank0():
            with atomic_dir(out) as staging:
                writer = dist.Rank0Writer(staging / "tb")
                try:
                    self._write(staging, stats, stats.groups, col_norms, meta, neuron_set)
                    self._report(neuron_set, writer)
                finally:
                    writer.close()
        dist.barrier()
        return neuron_set

    def _report(self, neuron_set: NeuronSet, writer: dist.Rank0Writer) -> None:
        counts = neuron_set.per_layer_counts()
        for layer, n in enumerate(counts):
            writer.scalar("identify/selected_per_layer", n, layer)
        writer.scalar("identify/param_fraction", neuron_set.param_fraction, 0)
        writer.scalar("identify/selected_neurons", neuron_set.count, 0)
        print(format_summary(neuron_set), flush=True)


VISION_DIR = "vision"


class VisionScope:
    """`--scope lm+vision`: statistics and a neuron set for the vision tower's MLPs (inputs of fc2/down).

    Every encoder row counts (patches, class token, tiles); rows are attributed to the batch's samples
    in equal blocks. The set is written to OUT/vision/ (a NeuronSet over vision layers, no parameter
    cap: training edits the language model only) with its own stats.safetensors.
    """

    def __init__(self, adapter, model, groups: list[str], device):
        self.mlps = adapter.vision_mlps(model)
        if not self.mlps:
            raise ShieldError(f"--scope lm+vision: no vision MLPs found for model_type {adapter.model_type}")
        widths = {ffn.down.in_features for _, ffn in self.mlps}
        if len(widths) != 1:
            raise ShieldError(f"--scope lm+vision: vision MLPs of different widths {sorted(widths)}")
        self.width = widths.pop()
        self.stats = ActivationStatistics(groups, len(self.mlps), self.width, device=device)
        self.stats.attach([ffn.down for _, ffn in self.mlps])

    def finish(self, identifier: "Identifier", lm_meta: dict) -> NeuronSet:
        self.stats.detach()
        self.stats.all_reduce()
        self.stats.to_cpu()
        norms = []
        for _, ffn in self.mlps:
            with gathered(ffn.down.weight):
                norms.append(ffn.down.weight.detach().to(torch.float64).norm(dim=0).cpu())
        image_groups = [g for g in self.stats.groups if self.stats.token_counts()[g] > 0]
        meta = {k: lm_meta[k] for k in ("model", "model_type", "config_hash", "score", "ratio", "world_size", "split",
                                        "test_fraction", "validation_fraction", "split_seed", "prompt_keys",
                                        "prompt_key_digest")}
        first = self.mlps[0][1]
        per_neuron = sum(p.in_features + (p.bias is not None) for p in first.rows.values()) + first.down.out_features
        meta.update({"scope": "vision", "num_layers": len(self.mlps), "intermediate_size": self.width,
                     "hidden_size": first.down.out_features, "modules": [n for n, _ in self.mlps],
                     "params_per_neuron": per_neuron, "total_params": lm_meta["total_params"],
                     "groups": {g: {"tokens": n} for g, n in self.stats.token_counts().items() if n > 0}})
        return identifier._select(self.stats, image_groups, torch.stack(norms), meta, None, cap=False)


def format_summary(neuron_set: NeuronSet) -> str:
    """A per-layer table of selected neurons (how many per layer) and the totals."""
    meta = neuron_set.meta
    width = neuron_set.intermediate_size
    counts = neuron_set.per_layer_counts()
    ranking = f" ranked {meta['cap_ranking']}" if meta.get("cap_ranking") else ""
    lines = [f"safety neurons ({meta.get('score')} score, ratio {meta.get('ratio')}, "
             f"cap {meta.get('max_param_fraction')}{ranking}) in {meta.get('model')}",
             f"{'layer':>5}  {'selected':>8}  {'of':>6}  share"]
    for layer, n in enumerate(counts):
        lines.append(f"{layer:>5}  {n:>8}  {width:>6}  {n / width:6.2%}")
    lines.append(f"total {neuron_set.count} neurons = {neuron_set.param_fraction:.6%} of "
                 f"{meta.get('total_params')} parameters, in {sum(n > 0 for n in counts)} of {len(counts)} layers")
    cap, per_neuron, total = meta.get("max_param_fraction"), meta.get("params_per_neuron"), meta.get("total_params")
    if cap and per_neuron and total and meta.get("scope") != "vision" and neuron_set.count < cap_neurons(cap, total, per_neuron):
        lines.append(f"the cap {cap} is not reached: the per-layer top-{meta.get('ratio')} selection has only these "
                     f"{neuron_set.count} candidates (a larger --ratio gives more, and another set)")
    groups = meta.get("groups", {})
    if groups:
        lines.append("groups: " + ", ".join(f"{g}={v['records']}" for g, v in sorted(groups.items())))
    return "\n".join(lines)
