"""The demo report: one markdown page with the tables and plots of every stage of a run directory.

    python -m shield_ds.report --run runs/demo

Expects the layout scripts/demo.sh writes: identify/ (all languages, with analysis/) and
experiment/ (recipes/experiment.py: eval-base/ with the ablation, arms/*/train and eval, results.md).
"""

from __future__ import annotations

import os
from pathlib import Path

from shield_ds.errors import ShieldError
from shield_ds.process_group import ToolParser, exit_on_error
from shield_ds.io import read_json, write_text
from shield_ds.data.splits import overlap_note
from shield_ds.defaults import TINY_NOTE, is_tiny_checkpoint
from shield_ds.neurons import NeuronSet
from shield_ds.plots import plt, save_figure


def _rel(path: Path, root: Path) -> str:
    return os.path.relpath(path, root)


def _image(path: Path, root: Path, alt: str) -> str:
    return f"![{alt}]({_rel(path, root)})\n" if path.exists() else f"_({alt}: not produced)_\n"


def loss_plot(tb_dir: Path, out: Path) -> Path | None:
    """Plot harmful/benign training loss from the tensorboard events (read with tensorboard's reader)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


    if not tb_dir.is_dir():
        return None
    events = EventAccumulator(str(tb_dir))
    events.Reload()
    tags = [t for t in ("train/loss_harmful", "train/loss_benign") if t in events.Tags().get("scalars", [])]
    if not tags:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for tag in tags:
        points = events.Scalars(tag)
        ax.plot([p.step for p in points], [p.value for p in points], label=tag.split("/")[-1])
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy on response tokens")
    ax.legend()
    save_figure(fig, out)
    return out


def build_report(run: Path, allow_overlap: bool = False) -> str:
    """The report of a demo run directory: identify/ (all languages, with analysis/) and experiment/.
    Evaluations on prompts their model was trained on are refused unless `allow_overlap`."""
    identify, experiment = run / "identify", run / "experiment"
    base, safety = experiment / "eval-base", experiment / "arms" / "safety"
    if not (identify / "neurons.json").exists():
        raise ShieldError(f"{run}: no identify/neurons.json (run the demo first)")
    if not (experiment / "results.md").exists():
        raise ShieldError(f"{run}: no experiment/results.md (run the demo first)")
    note = overlap_note([base, safety / "eval"], allow_overlap)
    ns = NeuronSet.load(identify)
    meta = ns.meta
    out = [f"# Precise Shield demo report\n\nRun directory: `{run}`. Model: `{meta['model']}` "
           f"({meta['model_type']}, {meta['total_params']:,} parameters, {meta['num_layers']} layers x "
           f"{meta['intermediate_size']} FFN neurons). Identification ran on {meta['world_size']} ranks.\n"]
    if is_tiny_checkpoint(meta["model"]):
        out.append(f"\n**{TINY_NOTE}**\n")

    out.append("\n## 1. Safety neurons (all ten languages, text and typographic, train split)\n\n")
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

    out.append("\n## 3. Causal ablation (base model, test prompts)\n\nThe safety neurons' activations are zeroed at "
               "inference; controls zero the same number of random neurons per layer.\n\n")
    out.append((base / "ablation.md").read_text(encoding="utf-8") if (base / "ablation.md").exists()
               else "_not produced (evaluate --ablate)_\n")

    out.append("\n## 4. The arms on held-out test prompts\n\n")
    results = (experiment / "results.md").read_text(encoding="utf-8").split("\n", 1)[1]
    out.append(results.replace("## ", "### ").replace("](results.png)", f"]({_rel(experiment / 'results.png', run)})")
               .strip() + "\n")

    out.append("\n## 5. Shield training of the safety arm\n\n")
    if (safety / "train" / "train.json").exists():
        summary = read_json(safety / "train" / "train.json")
        cfg = summary["config"]
        out.append(f"{summary['steps']} optimizer steps on {summary['world_size']} ranks, update mode "
                   f"`{cfg['update']}`, {summary['records']} records ({cfg.get('split', 'all')} split, languages {cfg['languages'] or 'all'}, "
                   f"modalities {cfg['modalities']}); trainable tensors hold {summary.get('optimizer_params', summary['trainable_params']):,} "
                   f"parameters, of which the {summary['neurons']} neurons' slices "
                   f"({summary['neuron_param_fraction']:.4%} of the model) may change.\n\n")
        plot = loss_plot(safety / "train" / "tb", run / "train_loss.png")
        if plot:
            out.append(_image(plot, run, "training loss"))
    else:
        out.append("_not produced_\n")

    out.append(f"\n## 6. Attack success rate per language x modality, base vs safety arm{' ' + note if note else ''}\n\n")
    if (safety / "eval" / "compare.md").exists():
        out.append((safety / "eval" / "compare.md").read_text(encoding="utf-8") + "\n")
        out.append(_image(base / "asr_heatmap.png", run, "ASR base"))
        out.append(_image(safety / "eval" / "asr_heatmap.png", run, "ASR safety arm"))
    else:
        out.append("_not produced_\n")
    return "".join(out)


@exit_on_error
def main(argv: list[str] | None = None) -> None:
    p = ToolParser(prog="python -m shield_ds.report", description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, type=Path)
    p.add_argument("--allow-overlap", action="store_true", help="present evaluations on trained prompts (says so)")
    args = p.parse_args(argv)
    text = build_report(args.run, args.allow_overlap)
    write_text(args.run / "report.md", text)
    print(f"wrote {args.run / 'report.md'}")


if __name__ == "__main__":
    main()
