"""The demo report: one markdown page with the tables and plots of every stage of a run directory.

    python -m shield_ds.report --run runs/demo [--trained-languages en,zh,it,vi --trained-modalities text]

Expects the layout scripts/demo.sh writes: identify/ (with analysis/), eval-base/ (with the
ablation), train/, eval-shielded/ (with the comparison against eval-base).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from shield_ds.config import csv_list
from shield_ds.errors import ShieldError, exit_on_error
from shield_ds.io import write_text


def _rel(path: Path, root: Path) -> str:
    return os.path.relpath(path, root)


def _image(path: Path, root: Path, alt: str) -> str:
    return f"![{alt}]({_rel(path, root)})\n" if path.exists() else f"_({alt}: not produced)_\n"


def loss_plot(tb_dir: Path, out: Path) -> Path | None:
    """Plot harmful/benign training loss from the tensorboard events (read with tensorboard's reader)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from shield_ds.analysis.plots import save_figure

    if not tb_dir.is_dir():
        return None
    events = EventAccumulator(str(tb_dir))
    events.Reload()
    tags = [t for t in ("train/loss_harmful", "train/loss_benign") if t in events.Tags().get("scalars", [])]
    if not tags:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for tag in tags:
        points = events.Scalars(tag)
        ax.plot([p.step for p in points], [p.value for p in points], label=tag.split("/")[-1])
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy on response tokens")
    ax.legend()
    save_figure(fig, out)
    return out


def build_report(run: Path, trained_languages: list[str] | None, trained_modalities: list[str] | None) -> str:
    from shield_ds.evaluate.asr import load_asr, transfer_markdown, transfer_table
    from shield_ds.neurons import NeuronSet

    identify, base, train, shielded = run / "identify", run / "eval-base", run / "train", run / "eval-shielded"
    if not (identify / "neurons.json").exists():
        raise ShieldError(f"{run}: no identify/neurons.json (run the demo first)")
    ns = NeuronSet.load(identify)
    meta = ns.meta
    out = [f"# Precise Shield demo report\n\nRun directory: `{run}`. Model: `{meta['model']}` "
           f"({meta['model_type']}, {meta['total_params']:,} parameters, {meta['num_layers']} layers x "
           f"{meta['intermediate_size']} FFN neurons). Identification ran on {meta['world_size']} ranks.\n\n"
           "The demo model is a tiny random checkpoint: the numbers show that every stage runs end to end "
           "and what it reports, not the safety of a real model.\n"]

    out.append("\n## 1. Safety neurons\n\n")
    ranking = f" (ranked {meta['cap_ranking']})" if meta.get("cap_ranking") else ""
    out.append(f"Score `{meta['score']}`, per-layer ratio {meta['ratio']}, "
               f"parameter cap {meta['max_param_fraction']}{ranking}; "
               f"{ns.count} neurons selected = **{ns.param_fraction:.4%}** of all parameters.\n\n")
    rows = "\n".join(f"| {i} | {n} | {n / ns.intermediate_size:.2%} |" for i, n in enumerate(ns.per_layer_counts()))
    out.append("| layer | neurons | share of the layer |\n| --- | --- | --- |\n" + rows + "\n")
    groups = meta.get("groups", {})
    out.append(f"\nStatistics from {sum(g['records'] for g in groups.values())} records in {len(groups)} groups "
               f"(label x language x modality), {sum(g['tokens'] for g in groups.values()):,} prompt tokens.\n")

    analysis = identify / "analysis"
    out.append("\n## 2. Overlap of the neuron sets across languages and modalities\n\n")
    if (analysis / "analysis.md").exists():
        text = (analysis / "analysis.md").read_text(encoding="utf-8")
        body = text.split("\n", 1)[1] if text.startswith("# ") else text
        out.append(body.replace("## ", "### ").strip() + "\n\n")
        for name, alt in (("jaccard_languages.png", "Jaccard across languages"),
                          ("jaccard_modalities.png", "Jaccard across modalities"),
                          ("per_layer.png", "safety neurons per layer")):
            out.append(_image(analysis / name, run, alt))
    else:
        out.append("_not produced (run recipes/analyze.py)_\n")

    out.append("\n## 3. Causal ablation (base model)\n\nThe safety neurons' activations are zeroed at inference; "
               "controls zero the same number of random neurons per layer.\n\n")
    out.append((base / "ablation.md").read_text(encoding="utf-8") if (base / "ablation.md").exists()
               else "_not produced (evaluate --ablate)_\n")

    out.append("\n## 4. Shield training\n\n")
    if (train / "train.json").exists():
        summary = json.loads((train / "train.json").read_text(encoding="utf-8"))
        cfg = summary["config"]
        out.append(f"{summary['steps']} optimizer steps on {summary['world_size']} ranks, update mode "
                   f"`{cfg['update']}`, {summary['records']} records (languages {cfg['languages'] or 'all'}, "
                   f"modalities {cfg['modalities']}); trainable tensors hold {summary['trainable_params']:,} "
                   f"parameters, of which the {summary['neurons']} neurons' slices "
                   f"({summary['neuron_param_fraction']:.4%} of the model) may change. Exported: `train/model/` "
                   f"and `train/shield_patch.safetensors`.\n\n")
        plot = loss_plot(train / "tb", run / "train_loss.png")
        if plot:
            out.append(_image(plot, run, "training loss"))
    else:
        out.append("_not produced_\n")

    out.append("\n## 5. Attack success rate, base vs shielded\n\n")
    if (shielded / "compare.md").exists():
        out.append((shielded / "compare.md").read_text(encoding="utf-8") + "\n")
        out.append(_image(base / "asr_heatmap.png", run, "ASR base"))
        out.append(_image(shielded / "asr_heatmap.png", run, "ASR shielded"))
    else:
        out.append("_not produced_\n")

    if trained_languages or trained_modalities:
        before, after = load_asr(base), load_asr(shielded)
        held = [f"lang-{l}" for l in before.languages if trained_languages and l not in trained_languages]
        held += [f"modality-{m}" for m in before.modalities if trained_modalities and m not in trained_modalities]
        out.append("\n## 6. Zero-shot transfer to held-out languages and modalities\n\n"
                   f"Trained on languages {', '.join(trained_languages or ['all'])} and modalities "
                   f"{', '.join(trained_modalities or ['all'])}; every other group below was never trained on.\n\n")
        out.append(transfer_markdown(transfer_table(before, after, held)) + "\n" if held else "_no held-out group_\n")
    return "".join(out)


@exit_on_error
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m shield_ds.report", description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, type=Path)
    p.add_argument("--trained-languages", default=None)
    p.add_argument("--trained-modalities", default=None)
    args = p.parse_args(argv)
    text = build_report(args.run, csv_list(args.trained_languages), csv_list(args.trained_modalities))
    write_text(args.run / "report.md", text)
    print(f"wrote {args.run / 'report.md'}")


if __name__ == "__main__":
    main()
