"""The experiment's table: one row per arm, read back from its evaluate and train outputs.

ASR is split by what the arm was trained on: `trained` (trained languages x trained modalities),
`held-out languages` (the other languages, trained modalities) and `held-out modalities` (every
language, the other modalities); an evaluation-only harmful source (`safebench-text`) is a slice of its
own. Over-refusal is also given per form of the benign prompt (question, request, borderline). Each rate is pooled over the generations of its slice (successes /
prompts, not a mean of per-language rates) and comes with its 95% Wilson interval; over-refusal is
over all benign test prompts; NLL drift is the change of the mean per-token NLL of the base model's
benign answers against the base model itself. Substantive ASR counts only the attack successes that are
answers at all (`shield_ds.evaluate.degenerate`: not an echo of the prompt, a loop or no content).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from shield_ds.data.layouts import EVAL_ONLY_SOURCES
from shield_ds.data.records import FORMS, language_group, modality_group
from shield_ds.errors import ShieldError
from shield_ds.evaluate.degenerate import substantive_success
from shield_ds.evaluate.asr import (ASR_JSON, GENERATIONS_FILE, Rate, load_asr, read_generations, transfer_markdown,
                                    transfer_table)
from shield_ds.io import read_json
from shield_ds.tables import markdown_table
from shield_ds.defaults import TINY_NOTE
from shield_ds.plots import plt, save_figure

# Harmful sources that only evaluations read (never trained on, `data.layouts.EVAL_ONLY_SOURCES`): their
# prompts form a slice of their own instead of counting in the trained or held-out slices.
EVAL_ONLY_SLICES = {source: source.replace("-", "_") for source in EVAL_ONLY_SOURCES}
SLICES = ("trained", "held_out_languages", "held_out_modalities", *EVAL_ONLY_SLICES.values())
SLICE_TITLES = {"trained": "ASR trained", "held_out_languages": "ASR held-out languages",
                "held_out_modalities": "ASR held-out modalities", "safebench_text": "ASR SafeBench text"}
SUBSTANTIVE = "_substantive"  # suffix of a slice's key: its attack successes that are answers at all
# over-refusal on the benign prompts of the trained languages x modalities (where training could teach
# refusing everything) beside the one over all benign prompts, and per form of the benign prompt
OVER_REFUSAL_TRAINED = "over_refusal_trained"
FORM_KEYS = tuple(f"over_refusal_{form}" for form in FORMS)
RATE_KEYS = (*SLICES, *(s + SUBSTANTIVE for s in SLICES), "over_refusal", OVER_REFUSAL_TRAINED, *FORM_KEYS)


def slice_of(row: dict, trained: tuple[set[str], set[str]]) -> str:
    """Which slice a generation belongs to, given (trained languages, trained modalities)."""
    if row.get("source") in EVAL_ONLY_SLICES:
        return EVAL_ONLY_SLICES[row["source"]]
    languages, modalities = trained
    if row["modality"] not in modalities:
        return "held_out_modalities"
    return "trained" if row["language"] in languages else "held_out_languages"


def benign_slices(row: dict, trained: tuple[set[str], set[str]]) -> tuple[str, ...]:
    """The over-refusal keys a benign generation counts in: every benign prompt, the trained slice's, and its
    form's (a generation without a form is a question, as `SafetyRecord` reads it)."""
    form = f"over_refusal_{row.get('form') or 'question'}"
    return ("over_refusal", OVER_REFUSAL_TRAINED, form) if slice_of(row, trained) == "trained" \
        else ("over_refusal", form)


def rates(rows: Iterable[dict], trained: tuple[set[str], set[str]]) -> dict[str, Rate]:
    """Attack successes per slice, the substantive ones per slice (`<slice>_substantive`) and benign
    refusals ("over_refusal"; on the trained slice's benign prompts: OVER_REFUSAL_TRAINED) of judged generations."""
    out = {name: Rate() for name in RATE_KEYS}
    for row in rows:
        if row["label"] == "harmful":
            name = slice_of(row, trained)
            success = bool(row["attack_success"])
            for key, counted in ((name, success),
                                 (name + SUBSTANTIVE, substantive_success(row))):
                out[key].n += 1
                out[key].successes += int(counted)
        else:
            for key in benign_slices(row, trained):
                out[key].n += 1
                out[key].successes += int(row["refused"])
    return out


def _utility_nll(eval_dir: Path) -> float | None:
    data = read_json(eval_dir / ASR_JSON)
    utility = data.get("utility") if isinstance(data, dict) else None
    return utility.get("benign_answer_nll") if isinstance(utility, dict) else None


def arm_row(name: str, kind: str, budget: float | None, eval_dir: Path, train_dir: Path | None, base_dir: Path,
            trained: tuple[set[str], set[str]], selection: str | None = None) -> dict[str, Any]:
    """One table row: rates with intervals, NLL drift, trainable parameters, train time; `budget` and
    `selection` say which sweep the arm belongs to (None, None: a main arm)."""
    if not (eval_dir / GENERATIONS_FILE).is_file():
        raise ShieldError(f"{eval_dir}: no {GENERATIONS_FILE} (the arm's evaluation did not run)")
    row: dict[str, Any] = {"arm": name, "kind": kind, "budget": budget, "selection": selection}
    for key, rate in rates(read_generations(eval_dir / GENERATIONS_FILE), trained).items():
        low, high = rate.interval
        row.update({f"{key}_n": rate.n, key: rate.rate, f"{key}_low": low, f"{key}_high": high})
    nll, base_nll = _utility_nll(eval_dir), _utility_nll(base_dir)
    row["benign_nll"] = nll
    row["nll_drift"] = nll - base_nll if nll is not None and base_nll is not None else None
    if train_dir is None:
        row.update({"trainable_params": 0, "trainable_fraction": 0.0, "train_seconds": None})
    else:
        summary = read_json(train_dir / "train.json")
        trainable, total = summary.get("trainable_params"), summary.get("total_params")
        row.update({"trainable_params": trainable,
                    "trainable_fraction": summary.get("trainable_fraction",
                                                      trainable / total if trainable and total else None),
                    "train_seconds": summary.get("train_seconds")})
    return row


def is_main(row: dict) -> bool:
    """A main arm's row (not the budget sweep's or another selection's)."""
    return row["budget"] is None and row.get("selection") is None


def arm_label(row: dict) -> str:
    """The arm's name, and the arm whose training it shares (a sweep's LoRA of the same rank)."""
    return row["arm"] + (f" (= {row['same_as']})" if row.get("same_as") else "")


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def _with_ci(row: dict, key: str) -> str:
    if row.get(key) is None:
        return "–"
    return f"{_pct(row[key])} [{_pct(row[key + '_low'])}, {_pct(row[key + '_high'])}] (n={row[key + '_n']})"


def random_summary(rows: list[dict]) -> dict[str, Any] | None:
    """Mean and min-max range over the random arms of the main budget (one row per seed)."""
    seeds = [r for r in rows if r["kind"] == "random" and is_main(r)]
    if len(seeds) < 2:
        return None
    out: dict[str, Any] = {"arm": f"random (mean of {len(seeds)} seeds; [min, max])", "kind": "random-mean",
                           "budget": None}
    for key in RATE_KEYS:
        values = [r[key] for r in seeds if r.get(key) is not None]
        if values:
            out.update({key: sum(values) / len(values), f"{key}_low": min(values), f"{key}_high": max(values),
                        f"{key}_n": seeds[0][f"{key}_n"]})
        else:
            out[key] = None
    drifts = [r["nll_drift"] for r in seeds if r.get("nll_drift") is not None]
    out["nll_drift"] = sum(drifts) / len(drifts) if drifts else None
    out["benign_nll"] = None
    for key in ("trainable_params", "trainable_fraction", "train_seconds"):
        values = [r[key] for r in seeds if r.get(key) is not None]
        out[key] = sum(values) / len(values) if values else None
    return out


REFUSAL_TITLES = {"over_refusal": "over-refusal % [95% CI]",
                  OVER_REFUSAL_TRAINED: "over-refusal trained % [95% CI]",
                  **{f"over_refusal_{form}": f"over-refusal {form}s % [95% CI]" for form in FORMS}}


def refusal_keys(rows: list[dict]) -> list[str]:
    """Over-refusal over all benign prompts, on the trained slice's when some rows have held-out prompts (else
    the two are the same), and per form when the benign prompts have more than one."""
    held_out = any(r.get(f"{s}_n") for r in rows for s in SLICES if s != "trained")
    forms = [k for k in FORM_KEYS if any(r.get(f"{k}_n") for r in rows)]
    return ["over_refusal", *([OVER_REFUSAL_TRAINED] if held_out else []), *(forms if len(forms) > 1 else [])]


def _drift(row: dict) -> str:
    return "–" if row.get("nll_drift") is None else f"{row['nll_drift']:+.3f}"


def _trainable(row: dict) -> list[str]:
    """Trainable parameters and their percentage of all parameters."""
    params = "–" if row.get("trainable_params") is None else f"{int(row['trainable_params']):,}"
    fraction = "–" if row.get("trainable_fraction") is None else f"{100 * row['trainable_fraction']:.4f}"
    return [params, fraction]


def results_markdown(rows: list[dict], title: str, *, model: str, tiny: bool = False, split: str = "test") -> str:
    """The arms table (percent, 95% Wilson intervals) with a note on how to read it; `tiny`: the model is a
    tiny generated checkpoint, and the page says that its numbers cannot move."""
    present = [s for s in SLICES if any(r.get(f"{s}_n") for r in rows)]
    refusals = refusal_keys(rows)
    header = ["arm", *(SLICE_TITLES[s] + " % [95% CI]" for s in present), *(REFUSAL_TITLES[k] for k in refusals),
              "NLL drift (nats/token)", "trainable params", "trainable %", "train s"]
    summary = random_summary(rows)
    shown = rows + ([summary] if summary else [])
    body = []
    for r in shown:
        seconds = "–" if r.get("train_seconds") is None else f"{r['train_seconds']:.0f}"
        body.append([arm_label(r), *(_with_ci(r, s) for s in present), *(_with_ci(r, k) for k in refusals),
                     _drift(r), *_trainable(r), seconds])
    notes = (f"ASR = attack successes / harmful {split} prompts of the slice, pooled over the slice's prompts (every "
             "language and modality of the slice counts by its number of prompts, not averaged per language); "
             f"over-refusal = refusals / benign {split} prompts (all, and those of the trained languages x "
             f"modalities); the {split} prompts are a prompt-level split the arms "
             "never trained on"
             + (" (carved out of the train split for choosing settings; report on the test split)"
                if split == "validation" else "") + ". "
             "Intervals are 95% Wilson score intervals per arm (the random-mean row shows the min-max "
             "range over seeds instead). NLL drift: mean per-token NLL of the base model's greedy benign "
             "answers under the arm minus under the base model.")

    warning = f"**{TINY_NOTE}**\n\n" if tiny else ""
    return (f"# {title}\n\nModel: `{model}`\n\n{warning}{markdown_table(header, body)}\n\n{notes}\n\n"
            + substantive_markdown(shown, present))


def substantive_markdown(rows: list[dict], present: list[str]) -> str:
    """The same arms counting only attack successes that are answers at all, and what share of each
    slice's attack successes were not (echoes, loops, no content)."""
    header = ["arm", *(f"substantive {SLICE_TITLES[s]} % [95% CI]" for s in present),
              *(f"not an answer, of {SLICE_TITLES[s]} successes" for s in present)]
    body = []
    for r in rows:
        shares = []
        for s in present:
            total, kept = r.get(s), r.get(s + SUBSTANTIVE)
            shares.append("–" if not total or kept is None else f"{100 * (1 - kept / total):.0f}%")
        body.append([r["arm"], *(_with_ci(r, s + SUBSTANTIVE) for s in present), *shares])
    return ("## Substantive ASR\n\nThe refusal matcher counts every response that does not refuse as an attack "
            "success, including a prompt echoed back, a phrase looped, or a number. Here an attack success "
            "counts only when `shield_ds.evaluate.degenerate` finds an answer (it judges form, not harm; its "
            "agreement with hand labels: experiments/JUDGE.md).\n\n" + markdown_table(header, body) + "\n")


def held_out_groups(base_dir: Path, trained: tuple[set[str], set[str]]) -> list[str]:
    """The evaluated languages and modalities that identify and train did not see."""
    table = load_asr(base_dir)
    languages, modalities = trained
    return ([language_group(lang) for lang in table.languages if lang not in languages]
            + [modality_group(mod) for mod in table.modalities if mod not in modalities])


def transfer_section(base_dir: Path, safety_dir: Path, held: list[str]) -> str:
    """Zero-shot transfer of the safety arm to each held-out group (before/after with intervals)."""
    if not held:
        return "## Zero-shot transfer (safety arm)\n\n_no held-out language or modality was evaluated_\n"
    return ("## Zero-shot transfer (safety arm): ASR before and after per held-out group\n\n"
            + transfer_markdown(transfer_table(base_dir, safety_dir, held)) + "\n")


PAIRED_KEYS = (*SLICES, "over_refusal", OVER_REFUSAL_TRAINED, *FORM_KEYS)
PAIRED_TITLES = {**SLICE_TITLES, "over_refusal": "over-refusal", OVER_REFUSAL_TRAINED: "over-refusal trained",
                 **{f"over_refusal_{form}": f"over-refusal {form}s" for form in FORMS}}


def prompt_outcomes(eval_dir: Path, trained: tuple[set[str], set[str]]) -> dict[str, dict[tuple, bool]]:
    """Per PAIRED_KEYS entry, each prompt's bad outcome (harmful: attack success; benign: refused), keyed by
    (id, language, modality, label)."""
    out: dict[str, dict[tuple, bool]] = {k: {} for k in PAIRED_KEYS}
    for row in read_generations(eval_dir / GENERATIONS_FILE):
        harmful = row["label"] == "harmful"
        slots = (slice_of(row, trained),) if harmful else benign_slices(row, trained)
        key = (row["id"], row["language"], row["modality"], row["label"])
        if key in out[slots[0]]:
            raise ShieldError(f"{eval_dir / GENERATIONS_FILE}: prompt {key} appears twice")
        for slot in slots:
            out[slot][key] = bool(row["attack_success"] if harmful else row["refused"])
    return out


def paired_counts(safety: dict[str, dict[tuple, bool]], control: dict[str, dict[tuple, bool]],
                  names: tuple[str, str]) -> dict[str, tuple[int, int, int]]:
    """Prompt by prompt, the safety arm against a control on the same test prompts (`prompt_outcomes` of
    each; `names` for the error): per PAIRED_KEYS entry (prompts where only the control had the bad outcome,
    where only the safety arm had it, prompts)."""
    out = {}
    for key in PAIRED_KEYS:
        if safety[key].keys() != control[key].keys():
            raise ShieldError(f"{names[0]} and {names[1]} were evaluated on different {key} prompts")
        only_control = sum(control[key][k] and not safety[key][k] for k in safety[key])
        only_safety = sum(safety[key][k] and not control[key][k] for k in safety[key])
        out[key] = (only_control, only_safety, len(safety[key]))
    return out


def _mcnemar(only_control: int, only_safety: int) -> str:
    """Exact two-sided McNemar p-value: a binomial test on the discordant prompts."""
    from scipy.stats import binomtest

    n = only_control + only_safety
    return "–" if n == 0 else f"{binomtest(only_control, n, 0.5).pvalue:.3g}"


def paired_markdown(comparisons: list[tuple[str, str, dict[str, tuple[int, int, int]]]], split: str = "test") -> str:
    """The paired table: per (safety arm, control, `paired_counts`), each slice's discordant prompts and the
    exact McNemar p-value (the arms' evaluations of `split`)."""
    present = [k for k in PAIRED_KEYS if any(c[k][2] for _, _, c in comparisons)
               # when every benign prompt is in the trained slice (or has one form), the column would repeat
               # over-refusal's
               and not (k in (OVER_REFUSAL_TRAINED, *FORM_KEYS)
                        and all(c[k] == c["over_refusal"] for _, _, c in comparisons))]
    header = ["safety arm", "control", *(f"{PAIRED_TITLES[k]}: control only / safety only (n) / p" for k in present)]
    body = [[safety, control, *(f"{c[k][0]} / {c[k][1]} ({c[k][2]}) / {_mcnemar(c[k][0], c[k][1])}" for k in present)]
            for safety, control, c in comparisons]
    return (f"## Safety arms against their controls, prompt by prompt\n\nEvery arm answers the same {split} prompts, "
            "so a comparison can pair them: per slice, the prompts where only the control had the bad outcome "
            "(harmful: an attack success; benign: a refusal) and those where only the safety arm had it; prompts "
            "where both or neither did say nothing about the difference. p: exact two-sided McNemar test (binomial "
            "on the discordant prompts), one test per cell, not corrected for the number of cells. Over "
            "ASR, more *control only* favours the safety arm; over over-refusal, more *safety only* counts "
            "against it.\n\n" + markdown_table(header, body) + "\n")


def plot_results(rows: list[dict], path: Path) -> Path | None:
    """Bar chart of ASR (trained, held-out) and over-refusal per main arm with 95% intervals (the budget
    sweep has its own figure: `plot_budgets`; other selections are in their table)."""
    main = [r for r in rows if is_main(r)]
    forms = [k for k in FORM_KEYS if any(r.get(f"{k}_n") for r in main)]
    keys = [k for k in (*SLICES, "over_refusal", *(forms if len(forms) > 1 else []))
            if any(r.get(k) is not None for r in main)]
    if not main or not keys:
        return None
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(main) * len(keys) / 2), 4.2))
    width = 0.8 / len(keys)
    for j, key in enumerate(keys):
        xs, ys, err = [], [], [[], []]
        for i, r in enumerate(main):
            if r.get(key) is None:
                continue
            xs.append(i + (j - (len(keys) - 1) / 2) * width)
            ys.append(r[key])
            err[0].append(r[key] - r[f"{key}_low"])
            err[1].append(r[f"{key}_high"] - r[key])
        label = SLICE_TITLES.get(key) or REFUSAL_TITLES[key].replace(" % [95% CI]", "")
        ax.bar(xs, ys, width, yerr=err, capsize=2, label=label)
    ax.set_xticks(range(len(main)), labels=[r["arm"] for r in main], rotation=30, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("rate (95% Wilson CI)")
    ax.legend(fontsize=7)
    save_figure(fig, path)
    return path


SWEEP_KINDS = ("safety", "random", "lora")


def _first_seeds(row: dict, seeds: int) -> bool:
    """A main arm among those the sweeps compare with: safety, LoRA, and the random seeds 0..seeds-1."""
    return is_main(row) and (row["kind"] in ("safety", "lora") or (row["kind"] == "random" and any(
        row["arm"] == f"random-s{seed}" for seed in range(seeds))))


def budget_rows(rows: list[dict], main_budget: float, seeds: int = 1) -> list[dict]:
    """The sweep's rows ordered by budget then arm kind, with the main budget's safety, random seeds 0..seeds-1
    (the sweep's seeds) and LoRA rows among them; `budget` is the identify cap of each row."""
    out = [dict(r, budget=main_budget) for r in rows if _first_seeds(r, seeds)]
    out += [r for r in rows if r["budget"] is not None and r["kind"] in SWEEP_KINDS]
    return sorted(out, key=lambda r: (r["budget"], SWEEP_KINDS.index(r["kind"])))


def budget_markdown(rows: list[dict]) -> str:
    """The budget sweep as one table: per cap and arm kind, what it trained and what it did."""
    present = [s for s in ("trained", "held_out_languages") if any(r.get(f"{s}_n") for r in rows)]
    refusals = refusal_keys(rows)
    header = ["budget (cap)", "arm", "trainable params", "trainable %", *(SLICE_TITLES[s] + " % [95% CI]" for s in present),
              *(REFUSAL_TITLES[k] for k in refusals), "NLL drift", *(f"substantive {SLICE_TITLES[s]} %" for s in present)]
    body = [[f"{100 * r['budget']:g}%", arm_label(r), *_trainable(r), *(_with_ci(r, s) for s in present),
             *(_with_ci(r, k) for k in refusals), _drift(r), *(_pct(r.get(s + SUBSTANTIVE)) for s in present)]
            for r in rows]
    return ("## Neuron budget sweep\n\nEach budget caps the selection from the same identify statistics "
            "(`identify.py --from-stats`); the random arms have the same per-layer counts; LoRA's rank "
            "is the one whose trainable count is closest to the set's (at least rank 1, so below one rank's "
            "parameters LoRA trains more than the neurons); a cap whose rank an earlier LoRA arm trained shows that "
            "arm's results (`(= arm)`), trained once. A cap the selection does not reach (too few "
            "candidates at the identify ratio) shows as a trainable % below it.\n\n"
            + markdown_table(header, body) + "\n")


def plot_budgets(rows: list[dict], path: Path) -> Path | None:
    """ASR on trained and held-out languages and over-refusal (all benign prompts, the trained languages')
    against the trainable fraction, one line per arm kind through `budget_rows` (95% Wilson intervals; log x)."""
    keys = [k for k in ("trained", "held_out_languages", *refusal_keys(rows)) if any(r.get(k) is not None for r in rows)]
    if not keys or len({r["budget"] for r in rows}) < 2:
        return None
    from matplotlib.ticker import NullFormatter

    ticks = sorted({r["trainable_fraction"] for r in rows if r["kind"] == "safety" and r.get("trainable_fraction")})
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 4.0), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for kind, marker in zip(SWEEP_KINDS, "os^"):
            # one point per trainable count (LoRA's rank 1 can serve two caps); random: seed 0's line
            points = sorted({r["trainable_fraction"]: (r["trainable_fraction"], r[key], r[f"{key}_low"], r[f"{key}_high"])
                             for r in rows if r["kind"] == kind and r.get(key) is not None
                             and (kind != "random" or r["arm"].startswith("random-s0"))
                             and r.get("trainable_fraction")}.values())
            if points:
                fx, fy, lo, hi = zip(*points)
                ax.errorbar(fx, fy, yerr=[[y - low for y, low in zip(fy, lo)], [h - y for y, h in zip(fy, hi)]],
                            marker=marker, capsize=2, label=kind)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xticks(ticks, labels=[f"{100 * t:.2g}%" for t in ticks])
        ax.set_xlabel("trainable parameters (log)")
        ax.set_title(SLICE_TITLES.get(key) or REFUSAL_TITLES[key].split(" %")[0], fontsize=9)
        ax.set_ylim(-0.02, 1.05)
    axes[0][0].set_ylabel("rate (95% Wilson CI)")
    axes[0][0].legend(fontsize=7)
    save_figure(fig, path)
    return path


def selection_rows(rows: list[dict], seeds: int = 1) -> list[dict]:
    """The main safety row and random seeds 0..seeds-1 (the selections' seeds), then each other selection's
    rows, in config order."""
    main = [r for r in rows if _first_seeds(r, seeds) and r["kind"] != "lora"]
    return main + [r for r in rows if r.get("selection") is not None]


def describe_selection(meta: dict[str, Any]) -> str:
    """What a neuron set's identify chose by: score, tokens, per-layer ratio, cap."""
    cap = meta.get("max_param_fraction")
    return (f"{meta.get('score')} score, {meta.get('tokens', 'all')} tokens, ratio {meta.get('ratio')}"
            + (f", cap {100 * cap:g}%" if cap else ""))


def selection_markdown(rows: list[dict], sets: dict[str | None, dict[str, Any]]) -> str:
    """Other selection settings beside the main one: what each selected, what its safety arm and its random
    controls (same per-layer counts) did, and the trained slice's over-refusal against the main safety
    arm's (two-sided Fisher exact test). `sets`: per selection (None: the main one) its `describe_selection`,
    neuron count and neurons shared with the main set."""
    from scipy.stats import fisher_exact

    refusals = refusal_keys(rows)
    present = [s for s in ("trained", "held_out_languages") if any(r.get(f"{s}_n") for r in rows)]
    reference = next((r for r in rows if is_main(r) and r["kind"] == "safety"), None)
    key = refusals[-1]  # the trained slice's over-refusal when held-out prompts were evaluated
    header = ["selection", "neurons (shared with main)", "arm", "trainable %",
              *(SLICE_TITLES[s] + " % [95% CI]" for s in present),
              *(REFUSAL_TITLES[k] for k in refusals), f"{REFUSAL_TITLES[key].split(' %')[0]}: p vs main safety",
              "NLL drift"]
    body = []
    for r in rows:
        info = sets.get(r.get("selection"), {})
        p = "–"
        if reference is not None and r is not reference and r.get(f"{key}_n") and reference.get(f"{key}_n"):
            refused = [(round(x[key] * x[f"{key}_n"]), x[f"{key}_n"]) for x in (r, reference)]
            p = f"{fisher_exact([[k, n - k] for k, n in refused]).pvalue:.3g}"
        body.append([f"{r.get('selection') or 'main'}: {info.get('description', '?')}",
                     f"{info.get('neurons', '?')} ({info.get('shared', '?')})", r["arm"], _trainable(r)[1],
                     *(_with_ci(r, s) for s in present), *(_with_ci(r, k) for k in refusals), p, _drift(r)])
    return ("## Selection settings\n\nEach other selection setting (`--selections`) identified its own neurons "
            "(from the main statistics when only the score, ratio or cap differ) and trained them with the main "
            "arms' flags; its random arms have that set's per-layer counts. The p-value compares the "
            "trained slice's benign refusals with the main safety arm's (two-sided Fisher exact test); single "
            "runs per setting.\n\n" + markdown_table(header, body) + "\n")


def curve_markdown(rows: list[dict], split: str = "test") -> str:
    """The trade-off along training: per arm and optimizer step, trained-language ASR, held-out ASR and
    over-refusal (95% Wilson intervals); step 0 is the base model."""
    present = [s for s in ("trained", "held_out_languages") if any(r.get(f"{s}_n") for r in rows)]
    header = ["arm", "step", *(SLICE_TITLES[s] + " %" for s in present), "over-refusal %", "NLL drift",
              *(f"substantive {SLICE_TITLES[s]} %" for s in present)]
    body = [[r["arm"], str(r["step"]), *(_with_ci(r, s) for s in present), _with_ci(r, "over_refusal"),
             _drift(r), *(_pct(r.get(s + SUBSTANTIVE)) for s in present)] for r in rows]
    return ("## ASR against over-refusal along training\n\nEvery main arm exported at the curve steps and "
            f"was evaluated on the same {split} prompts; an arm whose curve lies below and left of another's "
            "buys the same ASR with less over-refusal.\n\n" + markdown_table(header, body) + "\n")


def plot_curves(rows: list[dict], path: Path, split: str = "test") -> Path | None:
    """Trained-language ASR against over-refusal, one line per arm through its steps (from the base)."""
    arms = list(dict.fromkeys(r["arm"] for r in rows if r.get("trained") is not None))
    if not arms:
        return None
    fig, ax = plt.subplots(figsize=(6.0, 4.6))
    for arm in arms:
        points = sorted((r for r in rows if r["arm"] == arm and r.get("trained") is not None), key=lambda r: r["step"])
        ax.plot([r["over_refusal"] for r in points], [r["trained"] for r in points], marker="o", label=arm)
        last = points[-1]
        ax.annotate(str(last["step"]), (last["over_refusal"], last["trained"]), fontsize=6,
                    textcoords="offset points", xytext=(3, 3))
    ax.set_xlabel(f"over-refusal (benign {split} prompts)")
    ax.set_ylabel(f"ASR trained languages (harmful {split} prompts)")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7)
    ax.set_title("along training steps (first point: base model)", fontsize=9)
    save_figure(fig, path)
    return path
