"""The analysis report of one identify output directory: CSVs, PNGs and `analysis.md`.

Files written into the output directory (each atomically):
- `per_layer.csv`, `per_layer.png`, `per_layer_heatmap.png`: selected neurons per decoder layer per set;
- `overlap_pairs.csv`: every pair of named sets (size, intersection, union, Jaccard, overlap coefficient,
  expected intersection under random sets of the same per-layer sizes, p-value);
- `jaccard_languages.csv/.png`, `jaccard_modalities.csv/.png`: Jaccard matrices (when >= 2 sets);
- `shared_core.csv` and `shared_core/` (a NeuronSet): neurons selected for every language;
- `analysis.json` (the numbers, with the split provenance the identify run recorded) and `analysis.md`
  (a readable summary).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shield_ds.analysis.overlap import (OverlapMatrix, expected_core_size, overlap_matrix, per_layer_distribution,
                                        shared_core, split_named_sets)
from shield_ds.data.records import LANGUAGES, MODALITIES, language_group, parse_group
from shield_ds.data.splits import recorded_split_provenance
from shield_ds.dist import get_logger
from shield_ds.errors import ShieldError
from shield_ds.io import write_json, write_text
from shield_ds.neurons.neuron_set import TENSORS_FILE, NeuronSet
from shield_ds.plots import grouped_bars, heatmap
from shield_ds.tables import markdown_table, rows_to_csv

log = get_logger("analysis.report")

MAIN_SET = "selected"  # the name the identify directory's own (combined) set gets in tables


def _matrix_csv(matrix: OverlapMatrix, metric: str) -> str:
    rows = [{"set": name, **{other: value for other, value in zip(matrix.names, row)}}
            for name, row in zip(matrix.names, matrix.values(metric))]
    return rows_to_csv(rows, ["set", *matrix.names])


def _ordered_sets(named: dict[str, NeuronSet]) -> dict[str, NeuronSet]:
    """Languages in MultiJail order, then modalities, then any other sets (alphabetically within each)."""
    def key(name: str) -> tuple[int, int, str]:
        parsed = parse_group(name)
        if parsed is None:
            return 2, 0, name
        kind, value = parsed
        family, order = (0, LANGUAGES) if kind == "language" else (1, MODALITIES)
        return family, order.index(value) if value in order else len(order), value

    return {name: named[name] for name in sorted(named, key=key)}


def _pair_kind(a: str, b: str) -> str:
    kinds = {name.split("-", 1)[0] if "-" in name else "other" for name in (a, b)}
    if kinds == {"lang"}:
        return "language"
    if kinds == {"modality"}:
        return "modality"
    return "cross"


def _fmt_p(p: float) -> str:
    return f"{p:.3g}" if p >= 1e-4 else f"{p:.1e}"


def analyze_identify_dir(identify_dir: str | Path, out_dir: str | Path | None = None) -> dict[str, Any]:
    """Load the sets of an identify output directory, compute overlaps and write the report.

    Returns the summary that `analysis.json` holds, plus `files` (the paths written).
    """
    identify_dir = Path(identify_dir)
    if not identify_dir.is_dir():
        raise ShieldError(f"{identify_dir}: no such identify output directory")
    out_dir = Path(out_dir) if out_dir is not None else identify_dir / "analysis"
    named = _ordered_sets(NeuronSet.load_named_sets(identify_dir))
    main = NeuronSet.load(identify_dir) if (identify_dir / TENSORS_FILE).exists() else None
    if main is None and not named:
        raise ShieldError(f"{identify_dir}: holds neither {TENSORS_FILE} nor sets/<name>/ neuron sets")
    all_sets = ({MAIN_SET: main} if main is not None else {}) | named
    languages, modalities = split_named_sets(named)
    files: list[Path] = []

    def text_file(name: str, text: str) -> None:
        write_text(out_dir / name, text)
        files.append(out_dir / name)

    # per-layer distribution
    per_layer = per_layer_distribution(all_sets)
    num_layers = max(len(v) for v in per_layer.values())
    layer_rows = [{"layer": i, **{name: counts[i] for name, counts in per_layer.items()}} for i in range(num_layers)]
    text_file("per_layer.csv", rows_to_csv(layer_rows, ["layer", *per_layer]))
    bar_series = {MAIN_SET: per_layer[MAIN_SET]} if main is not None else dict(per_layer)
    grouped_bars(bar_series, out_dir / "per_layer.png", title="Safety neurons per layer")
    files.append(out_dir / "per_layer.png")
    heatmap([per_layer[n] for n in per_layer], list(per_layer), [str(i) for i in range(num_layers)],
            out_dir / "per_layer_heatmap.png", title="Safety neurons per layer and set", vmin=0, vmax=None,
            cmap="Blues", colorbar_label="neurons", xlabel="layer",
            annotations=[[str(c) for c in per_layer[n]] for n in per_layer] if num_layers <= 32 else None)
    files.append(out_dir / "per_layer_heatmap.png")

    # pairwise overlaps among all named sets, and matrices per family
    pairs = overlap_matrix(named).rows() if len(named) >= 2 else []
    for row in pairs:
        row["kind"] = _pair_kind(row["a"], row["b"])
    pair_columns = ["a", "b", "kind", "size_a", "size_b", "intersection", "union", "jaccard",
                    "overlap_coefficient", "expected_intersection", "p_value"]
    text_file("overlap_pairs.csv", rows_to_csv(pairs, pair_columns))
    family_summary: dict[str, Any] = {}
    for family, sets in (("languages", languages), ("modalities", modalities)):
        if len(sets) < 2:
            continue
        matrix = overlap_matrix(sets)
        text_file(f"jaccard_{family}.csv", _matrix_csv(matrix, "jaccard"))
        notes = [[f"{v:.2f}" for v in row] for row in matrix.values("jaccard")]
        heatmap(matrix.values("jaccard"), matrix.names, matrix.names, out_dir / f"jaccard_{family}.png",
                title=f"Jaccard overlap of safety neurons across {family}", annotations=notes, vmax=1.0,
                cmap="Purples", colorbar_label="Jaccard")
        files.append(out_dir / f"jaccard_{family}.png")
        ratios = [p.jaccard for p in matrix.pairs.values()]
        family_summary[family] = {
            "sets": matrix.names, "mean_jaccard": sum(ratios) / len(ratios),
            "min_jaccard": min(ratios), "max_jaccard": max(ratios),
            "significant_pairs": sum(p.p_value < 0.05 for p in matrix.pairs.values()), "pairs": len(ratios),
        }

    # the core shared by every language
    core_summary = None
    if len(languages) >= 2:
        core = shared_core(languages.values())
        core.save(out_dir / "shared_core")
        files += [out_dir / "shared_core" / TENSORS_FILE, out_dir / "shared_core" / "neurons.json"]
        core_rows = [{"layer": i, "shared_core": c,
                      **{language_group(k): v.per_layer_counts()[i] for k, v in languages.items()}}
                     for i, c in enumerate(core.per_layer_counts())]
        text_file("shared_core.csv", rows_to_csv(core_rows, ["layer", "shared_core", *map(language_group, languages)]))
        smallest = min(s.count for s in languages.values())
        core_summary = {"languages": list(languages), "size": core.count, "per_layer": core.per_layer_counts(),
                        "expected_size_random": expected_core_size(list(languages.values())),
                        "fraction_of_smallest_language_set": core.count / smallest if smallest else 0.0}

    sets_summary = {name: {"size": s.count, "per_layer": s.per_layer_counts(),
                           "fraction_of_ffn_neurons": s.count / (s.num_layers * s.intermediate_size)}
                    for name, s in all_sets.items()}
    first = next(iter(all_sets.values()))
    summary: dict[str, Any] = {
        "identify_dir": str(identify_dir), **recorded_split_provenance(first.meta), "num_layers": first.num_layers,
        "intermediate_size": first.intermediate_size, "cap_ranking": first.meta.get("cap_ranking"),
        "sets": sets_summary, "families": family_summary,
        "shared_core": core_summary, "pairs": pairs,
    }
    write_json(out_dir / "analysis.json", summary)
    files.append(out_dir / "analysis.json")
    text_file("analysis.md", render_markdown(summary))
    log.info("analysis of %s written to %s (%d files)", identify_dir, out_dir, len(files) + 1)
    return {**summary, "files": [str(f) for f in files]}


def render_markdown(summary: dict[str, Any]) -> str:
    """The readable summary of `analyze_identify_dir`'s numbers."""
    n_layers, width = summary["num_layers"], summary["intermediate_size"]
    ranking = f" Parameter cap ranked `{summary['cap_ranking']}`." if summary.get("cap_ranking") else ""
    data = ""
    if summary.get("split") is not None:
        validation = (f", validation fraction {summary['validation_fraction']}"
                      if summary.get("validation_fraction") else "")
        data = (f" Data: {summary['split']} split (test fraction {summary['test_fraction']}{validation}, seed "
                f"{summary['split_seed']}), {summary['prompt_keys']} prompts, digest "
                f"`{str(summary['prompt_key_digest'])[:12]}`.")
    out = [f"# Safety neuron analysis\n\nIdentify output: `{summary['identify_dir']}` "
           f"({n_layers} layers x {width} FFN neurons).{ranking}{data}\n"]
    out.append("\n## Sets\n\n")
    out.append(markdown_table(["set", "neurons", "% of FFN neurons", "layers with neurons", "busiest layer"],
                              [[name, str(s["size"]), f"{100 * s['fraction_of_ffn_neurons']:.3f}%",
                                f"{sum(n > 0 for n in s['per_layer'])} of {len(s['per_layer'])}",
                                str(max(range(len(s["per_layer"])), key=s["per_layer"].__getitem__))
                                if s["size"] else "–"] for name, s in summary["sets"].items()]))
    for family, fam in summary["families"].items():
        out.append(f"\n## Overlap across {family}\n\n")
        out.append(f"Jaccard mean {fam['mean_jaccard']:.3f} (min {fam['min_jaccard']:.3f}, max {fam['max_jaccard']:.3f}); "
                   f"{fam['significant_pairs']} of {fam['pairs']} pairs overlap more than random sets of the same "
                   f"per-layer sizes would (p < 0.05). See `jaccard_{family}.png`.\n")
    if summary["pairs"]:
        out.append("\n## Pairs\n\np: probability that random sets with the same per-layer sizes overlap at least as "
                   "much (exact per-layer hypergeometric, convolved over layers).\n\n")
        out.append(markdown_table(
            ["a", "b", "size a", "size b", "shared", "shared if random", "Jaccard", "overlap coef.", "p"],
            [[p["a"], p["b"], str(p["size_a"]), str(p["size_b"]), str(p["intersection"]),
              f"{p['expected_intersection']:.1f}", f"{p['jaccard']:.3f}", f"{p['overlap_coefficient']:.3f}",
              _fmt_p(p["p_value"])] for p in summary["pairs"]]))
    core = summary["shared_core"]
    if core is not None:
        out.append(f"\n## Shared core across languages\n\n{core['size']} neurons are selected for all "
                   f"{len(core['languages'])} languages ({', '.join(core['languages'])}); random sets of the same "
                   f"sizes would share {core['expected_size_random']:.2f} on average. The core is "
                   f"{100 * core['fraction_of_smallest_language_set']:.1f}% of the smallest language set; it is saved "
                   f"as a neuron set in `shared_core/`, per layer in `shared_core.csv`.\n")
    out.append("\n## Per layer\n\nNeurons per decoder layer and set (also `per_layer.csv`, `per_layer.png`, "
               "`per_layer_heatmap.png`).\n\n")
    names = list(summary["sets"])
    out.append(markdown_table(["layer", *names],
                              [[str(layer), *(str(summary["sets"][n]["per_layer"][layer]) for n in names)]
                               for layer in range(n_layers)]))
    return "".join(out)
