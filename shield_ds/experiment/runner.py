"""The comparative experiment: base, safety neurons and their controls, on held-out prompts.

One config drives every stage as a separate launch of the stage recipes (so each stage runs under
the user's launcher: `deepspeed --num_gpus N`, `srun`, or plain `python`):

    evaluate base (test split)  ->  identify (train split, trained languages x modalities)
    -> for each arm: train (train split) -> evaluate (test split, all languages x modalities)
    (`--eval-split validation` with `--validation-fraction F` in `data_args`: the evaluations read a
    validation split carved out of the train split, for choosing settings, and write beside the test
    split's outputs (`split_name`: eval-validation/, results-validation.md, ...); the same run directory
    with `--eval-split test` then evaluates the same trained arms on the untouched test split)
    -> results.md / results.csv / results.png: ASR on trained and held-out languages and
       modalities with 95% Wilson intervals, over-refusal, benign-answer NLL drift, trainable
       parameters and fraction, train time; plus transfer.md (held-out groups before/after).

Arms: `safety` (the identified neurons), `random` (random neurons with the same per-layer counts,
one run per seed), `lora` (LoRA at the neuron set's trainable-parameter budget), `full-ffn` (every
FFN matrix; the upper bound). `budgets` adds a sweep: select again from the main identify's statistics
under each parameter budget (`identify.py --from-stats`, no forward passes) and train safety, random
neurons (`sweep_random_seeds` seeds) and matched LoRA there. `selections` adds other selection settings
(another score, the last prompt token's statistics, ...): each is identified (from the main statistics
when only selection flags differ) and trained as a safety arm and random arms with its per-layer counts.

A stage whose output is complete and whose arguments are unchanged is not run again (`stage.json`
beside its outputs), so an interrupted experiment continues where it stopped; `--force` reruns all.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence, get_args

from shield_ds import dist
from shield_ds.config import Modality, ModelConfig, option
from shield_ds.defaults import REPO_ROOT as REPO, is_tiny_checkpoint
from shield_ds.errors import ShieldError
from shield_ds.io import read_json, write_json, write_text
from shield_ds.data.splits import overlap_note
from shield_ds.experiment.results import (arm_row, budget_markdown, budget_rows, curve_markdown, describe_selection,
                                          held_out_groups, paired_counts, paired_markdown, plot_budgets, plot_curves,
                                          plot_results, prompt_outcomes, results_markdown, selection_markdown,
                                          selection_rows, transfer_section)
from shield_ds.launch.env import free_local_port
from shield_ds.neurons.identify import IdentifyConfig, SELECTION_KEYS
from shield_ds.neurons.neuron_set import NeuronSet
from shield_ds.tables import rows_to_csv
from shield_ds.train import BENIGN_TARGETS_FILE, snapshot_dir
from shield_ds.trainable import rank_for_budget

log = dist.get_logger("experiment")

ArmKind = Literal["safety", "random", "lora", "full-ffn"]
ARMS = get_args(ArmKind)
STAGE_FILE = "stage.json"
BUDGETS_DIR = "budgets"  # OUT/budgets/<cap>/: the budget sweep's identify and arms
SELECTIONS_DIR = "selections"  # OUT/selections/<name>/: another selection setting's identify and arms
# identify's own output and inputs, which the experiment sets for every selection
_RUNNER_FLAGS = ("out", "model", "languages", "modalities", "from_stats", "overwrite", "config")


def split_name(name: str, split: str) -> str:
    """The name of an output that depends on the evaluated split: `name` for the test split, `name-SPLIT`
    (before the extension) for another, so one run directory keeps both (`eval-base-validation/`,
    `results-validation.md`)."""
    if split == "test":
        return name
    stem, dot, ext = name.partition(".")
    return f"{stem}-{split}{dot}{ext}"


def _option_key(flag: str) -> str:
    """'--max-param-fraction=0.01' -> 'max_param_fraction' (the config field a flag sets)."""
    return flag[2:].split("=", 1)[0].replace("-", "_")


@dataclass(frozen=True)
class Selection:
    """Another selection setting: a name and the identify flags that make it (`NAME=FLAGS`)."""

    name: str
    flags: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> "Selection":
        from dataclasses import fields


        name, sep, flags = text.partition("=")
        name = name.strip()
        if not sep or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
            raise ShieldError(f"--selections {text!r}: expected NAME=IDENTIFY FLAGS (NAME: letters, digits, . _ -), "
                              "e.g. 'contrast=--score contrast'")
        try:
            words = tuple(shlex.split(flags))
        except ValueError as e:
            raise ShieldError(f"--selections {text!r}: {e}") from None
        if not words:
            raise ShieldError(f"--selections {text!r}: no identify flags after '='")
        known = {f.name for f in fields(IdentifyConfig)}
        for word in words:
            if not word.startswith("--"):
                continue
            key = _option_key(word)
            if key not in known or key in _RUNNER_FLAGS:
                why = "set by the experiment" if key in known or key == "config" else "not an identify option"
                raise ShieldError(f"--selections {text!r}: {word.split('=', 1)[0]} is {why}")
        return cls(name, words)

    @property
    def from_stats(self) -> bool:
        """Only flags that choose among neurons differ: select again from the main identify's statistics."""
        keys = {_option_key(w) for w in self.flags if w.startswith("--")}
        return keys <= set(SELECTION_KEYS)


@dataclass
class ExperimentConfig(ModelConfig):
    """The experiment's options: which arms, on which languages and modalities, launched how."""

    out: str = option("runs/experiment", "output directory")
    launcher: str = option("deepspeed --num_gpus 2", "command that starts a recipe on the ranks")
    eval_launcher: str | None = option(None, "launcher of the evaluations (default: --launcher; e.g. python with "
                                       "--ds-config none for a small model)")
    train_languages: list[str] = option(["en", "zh", "it", "vi"], "languages identify and train see")
    train_modalities: list[Modality] = option(["text"], "modalities identify and train see")
    eval_languages: list[str] | None = option(None, "languages to evaluate (default: all in the data)")
    eval_modalities: list[Modality] = option(["text"], "modalities to evaluate")
    arms: list[ArmKind] = option(list(ARMS), "comma-separated: safety,random,lora,full-ffn")
    random_seeds: int = option(3, "random-neuron arms (one per seed)")
    sweep_random_seeds: int = option(1, "random-neuron arms per swept budget and per other selection (seeds "
                                     "0..N-1; the main budget has --random-seeds)")
    budgets: list[float] = option([], "extra parameter budgets to sweep, e.g. 0.001,0.003,0.01")
    selections: list[str] = option([], "other selection settings, each trained as a safety arm and a random arm "
                                   "with its per-layer counts: NAME=IDENTIFY FLAGS, e.g. 'contrast=--score "
                                   "contrast' 'last=--tokens last' (flags that only choose among neurons reuse the "
                                   "main statistics)", commas=False)
    # The final step is the arm's main evaluation.
    curve_steps: list[int] = option([], "optimizer steps before --max-steps at which every main arm is also "
                                    "exported and evaluated (ASR vs over-refusal curves), e.g. 10,20")
    data_args: str = option("", "flags for every stage (sources, --test-fraction, --validation-fraction, "
                            "--split-seed)")
    eval_split: Literal["test", "validation"] = option("test", "the split every evaluation reads: validation "
                                                      "(needs --validation-fraction in --data-args) to choose "
                                                      "settings, test to report them")
    identify_args: str = option("", "extra flags for identify.py")
    train_args: str = option("", "extra flags for train.py (every arm)")
    evaluate_args: str = option("", "extra flags for evaluate.py")
    base_evaluate_args: str = option("", "extra flags for the base evaluation only (e.g. --ablate DIR)")
    lora_args: str = option("--lora-budget match", "flags of the LoRA arm")
    allow_overlap: bool = option(False, "tabulate evaluations on trained prompts (says so)")
    force: bool = option(False, "rerun stages that are already done")

    def validate(self) -> None:
        if not self.train_languages:
            raise ShieldError("--train-languages is empty (the languages identify and train see)")
        if self.random_seeds < 1 and "random" in self.arms:
            raise ShieldError(f"--random-seeds must be >= 1 with the random arm, got {self.random_seeds}")
        if self.sweep_random_seeds < 0:
            raise ShieldError(f"--sweep-random-seeds must be >= 0, got {self.sweep_random_seeds}")
        for b in self.budgets:
            if not 0 < b < 1:
                raise ShieldError(f"budget {b}: a parameter fraction must be in (0, 1)")
        if self.curve_steps:
            steps = _flag_value(self.train_args, "--max-steps")
            if steps is None:
                raise ShieldError("--curve-steps needs --max-steps in --train-args (the curve's last point)")
            late = [c for c in self.curve_steps if not 0 < c < int(steps)]
            if late:
                raise ShieldError(f"--curve-steps: step {late[0]} is not between 0 and --max-steps {steps}")
        if self.eval_split == "validation" and not float(_flag_value(self.data_args, "--validation-fraction") or 0):
            raise ShieldError("--eval-split validation needs --validation-fraction F > 0 in --data-args (every "
                              "stage must carve the same validation split out of the train split)")
        if _flag_value(self.evaluate_args, "--split") is not None:
            raise ShieldError("--evaluate-args: give the evaluations' split as --eval-split, not --split")
        names = [s.name for s in self.parsed_selections()]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ShieldError(f"--selections: the name {twice[0]!r} is given twice")

    def parsed_selections(self) -> list[Selection]:
        return [Selection.parse(text) for text in self.selections]


@dataclass
class Arm:
    """One trained variant: its name, the flags that make it, and where it writes."""

    name: str  # e.g. "safety", "random-s1", "lora"
    kind: str  # one of ARMS
    flags: list[str]
    root: Path
    identify: Path | None = None  # the neuron set it trains (or whose budget it matches); None: full FFN
    budget: float | None = None
    seed: int | None = None
    selection: str | None = None
    # a LoRA arm whose rank an earlier LoRA arm already trained: no stages of its own, that arm's results
    same_as: "Arm | None" = None
    eval_split: str = "test"  # the split its evaluation reads (`split_name` of its eval dir)

    @property
    def main(self) -> bool:
        """An arm of the main identify (not of the budget sweep or another selection)."""
        return self.budget is None and self.selection is None

    @property
    def train_dir(self) -> Path:
        return self.root / "train"

    @property
    def eval_dir(self) -> Path:
        return self.root / split_name("eval", self.eval_split)


@dataclass
class Stage:
    """One launch of a stage recipe: its arguments, output dir, the file that says it finished, and
    the output dirs of the stages it reads (rerun when one of them ran again)."""

    recipe: str
    args: list[str]
    out: Path
    finished: str
    depends: list[Path] = field(default_factory=list)


def _csv(values: Sequence[str]) -> str:
    return ",".join(values)


def _lora_summary(train_dir: Path) -> dict[str, Any] | None:
    """The LoRA settings a finished LoRA training recorded (rank, params_per_rank, ...), or None."""
    try:
        lora = read_json(train_dir / "train.json").get("lora")
    except ShieldError:
        return None
    return lora if isinstance(lora, dict) and "rank" in lora and "params_per_rank" in lora else None


def _neuron_params(identify: Path | None) -> int | None:
    """Trainable parameters of the neuron set a finished identify selected (LoRA's budget), or None."""
    try:
        meta = read_json(identify / "neurons.json") if identify is not None else None
    except ShieldError:
        return None
    if not isinstance(meta, dict) or "selected_neurons" not in meta or "params_per_neuron" not in meta:
        return None
    return int(meta["selected_neurons"]) * int(meta["params_per_neuron"])


def _own_port(launcher: list[str]) -> list[str]:
    """A one-node `deepspeed` launcher without --master_port gets a free one: its default (29500) is taken while
    another job on the machine, or the ranks of a stage just stopped, still hold it."""
    if not launcher or Path(launcher[0]).name != "deepspeed":
        return launcher
    chosen = ("--hostfile", "-H", "--master_addr", "--master-addr", "--master_port", "--master-port")
    if any(word.split("=", 1)[0] in chosen for word in launcher):
        return launcher
    return [*launcher, "--master_port", str(free_local_port())]


def code_version(repo: Path = REPO) -> dict[str, Any] | None:
    """The commit of the checkout a stage runs from and whether its tracked files differ from it (stage
    subprocesses import the working tree as it is when they start; untracked files are not looked at);
    None outside a git checkout."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=30)
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                                capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if head.returncode != 0 or status.returncode != 0:
        return None
    return {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip())}


def _flag_value(args: str, flag: str) -> str | None:
    """The value of `flag` in a shell-quoted argument string (the last one wins), or None."""
    words, value = shlex.split(args), None
    for i, word in enumerate(words):
        if word == flag and i + 1 < len(words):
            value = words[i + 1]
        elif word.startswith(flag + "="):
            value = word.split("=", 1)[1]
    return value


class Experiment:
    """Plans the stages of an `ExperimentConfig`, runs what is not done yet, and tabulates."""

    def __init__(self, cfg: ExperimentConfig):
        cfg.validate()
        self.cfg = cfg
        self.out = Path(cfg.out)

    # --- stage commands ------------------------------------------------------------------------
    def _train_selection(self) -> list[str]:
        return ["--languages", _csv(self.cfg.train_languages), "--modalities", _csv(self.cfg.train_modalities)]

    def _eval_selection(self) -> list[str]:
        langs = ["--languages", _csv(self.cfg.eval_languages)] if self.cfg.eval_languages else []
        return [*langs, "--modalities", _csv(self.cfg.eval_modalities)]

    def _common(self) -> list[str]:
        return ["--model", self.cfg.model, *shlex.split(self.cfg.data_args)]

    def _overlap(self) -> list[str]:
        return ["--allow-overlap"] if self.cfg.allow_overlap else []

    def identify_args(self, out: Path, budget: float | None = None) -> list[str]:
        extra = ["--max-param-fraction", repr(budget)] if budget is not None else []
        return [*self._common(), *self._train_selection(), "--out", str(out), "--overwrite",
                *shlex.split(self.cfg.identify_args), *extra]

    def arms(self) -> list[Arm]:
        """The main arms, then the budget sweep's (safety, random seeds, matched LoRA per budget), then each
        other selection's (safety and random seeds with its per-layer counts)."""
        cfg, identify = self.cfg, self.out / "identify"
        arms: list[Arm] = []
        for kind in cfg.arms:
            if kind == "safety":
                arms.append(self._arm(kind, identify, self.out / "arms"))
            elif kind == "random":
                arms += [self._arm(kind, identify, self.out / "arms", seed=seed)
                         for seed in range(cfg.random_seeds)]
            elif kind == "lora":
                arms.append(self._arm(kind, identify, self.out / "arms"))
            else:
                arms.append(Arm("full-ffn", kind, ["--update", "full-ffn"], self.out / "arms" / "full-ffn",
                                eval_split=cfg.eval_split))
        seeds = range(cfg.sweep_random_seeds)
        for budget in cfg.budgets:
            root, suffix = self.out / BUDGETS_DIR / f"{budget:g}", f"@{budget:g}"
            arms.append(self._arm("safety", root / "identify", root, suffix=suffix, budget=budget))
            arms += [self._arm("random", root / "identify", root, seed=seed, suffix=suffix, budget=budget)
                     for seed in seeds]
            arms.append(self._arm("lora", root / "identify", root, suffix=suffix, budget=budget))
        for selection in cfg.parsed_selections():
            root, suffix = self.out / SELECTIONS_DIR / selection.name, f"[{selection.name}]"
            arms.append(self._arm("safety", root / "identify", root, suffix=suffix, selection=selection.name))
            arms += [self._arm("random", root / "identify", root, seed=seed, suffix=suffix,
                               selection=selection.name) for seed in seeds]
        self._share_lora(arms)
        return arms

    def _share_lora(self, arms: list[Arm]) -> None:
        """A LoRA arm of the sweep whose rank (the one closest to its neuron set's parameters) an earlier LoRA
        arm trained with the same flags trains nothing: it is that arm (LoRA has no neurons, so the two would
        be the same run). Decided once its identify and the earlier arm's training finished; an arm that trained
        already keeps its own results."""
        match = _flag_value(self.cfg.lora_args, "--lora-budget") == "match"
        trained: list[tuple[Arm, dict[str, Any]]] = []
        for arm in (a for a in arms if a.kind == "lora"):
            lora = _lora_summary(arm.train_dir)
            if lora is not None:
                trained.append((arm, lora))
                continue
            params = _neuron_params(arm.identify) if match else None
            for other, done in trained:
                same_rank = params is not None and rank_for_budget(params, done["params_per_rank"]) == done["rank"]
                if not match or same_rank:
                    arm.same_as = other
                    break

    def _arm(self, kind: str, identify: Path, parent: Path, *, seed: int | None = None, suffix: str = "",
             budget: float | None = None, selection: str | None = None) -> Arm:
        """A safety, random (one seed) or LoRA arm of the neuron set in `identify`, written to parent/<name>."""
        name = kind
        if kind == "random":
            name, flags = f"random-s{seed}", ["--neurons", f"random:{seed}:{identify}"]
        elif kind == "lora":
            flags = ["--update", "lora", "--neurons", str(identify), *shlex.split(self.cfg.lora_args)]
        else:
            flags = ["--neurons", str(identify)]
        return Arm(name + suffix, kind, flags, parent / name, identify, budget, seed, selection,
                   eval_split=self.cfg.eval_split)

    def train_args(self, arm: Arm) -> list[str]:
        curve = (["--export-steps", ",".join(map(str, self.cfg.curve_steps))]
                 if self.cfg.curve_steps and arm.main else [])
        return [*self._common(), *self._train_selection(), *arm.flags, "--out", str(arm.train_dir),
                *shlex.split(self.cfg.train_args), *curve]

    def curve_points(self, arm: Arm) -> list[tuple[int, Path, Path]]:
        """(step, snapshot model dir, its evaluation dir) per curve step of a main arm (none for the sweep's)."""
        steps = self.cfg.curve_steps if arm.main else []
        return [(step, snapshot_dir(arm.train_dir, step) / "model", self.output(f"eval-step-{step}", arm.root))
                for step in steps]

    def output(self, name: str, parent: Path | None = None) -> Path:
        """parent/`split_name(name)` (parent: the run directory) for an output of the evaluated split."""
        return (parent or self.out) / split_name(name, self.cfg.eval_split)

    @property
    def base_eval_dir(self) -> Path:
        return self.output("eval-base")

    def evaluate_args(self, model: str, out: Path) -> list[str]:
        # the evaluations' default split is test: only another one is spelt out (unchanged stage arguments)
        split = ["--split", self.cfg.eval_split] if self.cfg.eval_split != "test" else []
        return ["--model", model, *shlex.split(self.cfg.data_args), *split, *self._eval_selection(), "--out", str(out),
                *(["--compare", str(self.base_eval_dir)] if out != self.base_eval_dir else []),
                *self._overlap(), *shlex.split(self.cfg.evaluate_args)]

    def plan(self) -> list[Stage]:
        """Every stage in order, each with the stages whose outputs it reads."""
        base = Stage("evaluate.py", [*self.evaluate_args(self.cfg.model, self.base_eval_dir),
                                     *shlex.split(self.cfg.base_evaluate_args)], self.base_eval_dir, "asr.json")
        main = Stage("identify.py", self.identify_args(self.out / "identify"), self.out / "identify", "neurons.json")
        identify = {main.out: main}
        for budget in self.cfg.budgets:  # the main identify's statistics, selected again under each budget
            root = self.out / BUDGETS_DIR / f"{budget:g}" / "identify"
            identify[root] = Stage("identify.py", [*self.identify_args(root, budget), "--from-stats", str(main.out)],
                                   root, "neurons.json", [main.out])
        for selection in self.cfg.parsed_selections():
            root = self.out / SELECTIONS_DIR / selection.name / "identify"
            reuse = ["--from-stats", str(main.out)] if selection.from_stats else []
            identify[root] = Stage("identify.py", [*self.identify_args(root), *selection.flags, *reuse], root,
                                   "neurons.json", [main.out] if reuse else [])
        stages = [base, *identify.values()]
        for arm in self.arms():
            if arm.same_as is not None:
                continue
            train = Stage("train.py", self.train_args(arm), arm.train_dir, "train.json",
                          [identify[arm.identify].out] if arm.identify is not None else [])
            stages.append(train)
            stages.append(Stage("evaluate.py", self.evaluate_args(str(arm.train_dir / "model"), arm.eval_dir),
                                arm.eval_dir, "asr.json", [train.out, base.out]))
            # each arm's curve right after it, so an interrupted run has whole arms to tabulate
            stages += [Stage("evaluate.py", self.evaluate_args(str(model), out), out, "asr.json", [train.out, base.out])
                       for _, model, out in self.curve_points(arm)]
        return stages

    # --- running -------------------------------------------------------------------------------
    @staticmethod
    def _stamp(out: Path) -> str | None:
        try:
            return read_json(out / STAGE_FILE).get("finished_at")
        except ShieldError:
            return None

    def _done(self, stage: Stage) -> bool:
        """Finished before with the same arguments, and no stage it reads has run since."""
        marker = stage.out / STAGE_FILE
        if self.cfg.force or not marker.is_file() or not (stage.out / stage.finished).is_file():
            return False
        try:
            recorded = read_json(marker)
        except ShieldError:
            return False
        return (recorded.get("args") == stage.args
                and recorded.get("upstream") == {str(d): self._stamp(d) for d in stage.depends})

    def run_stage(self, stage: Stage) -> None:
        """Launch one stage recipe, unless it is done already with the same arguments and inputs."""
        if self._done(stage):
            print(f"== done already: {stage.recipe} -> {stage.out}", flush=True)
            return
        launcher = self.cfg.launcher
        if stage.recipe == "evaluate.py" and self.cfg.eval_launcher:
            launcher = self.cfg.eval_launcher
        cmd = [*_own_port(shlex.split(launcher)), str(REPO / "recipes" / stage.recipe), *stage.args]
        # "python" (also after `env VAR=...`) is the interpreter running this: its environment has torch.
        cmd = [sys.executable if c in ("python", "python3") else c for c in cmd]
        print("==", " ".join(shlex.quote(c) for c in cmd), flush=True)
        code = code_version()
        start = time.perf_counter()
        if subprocess.run(cmd, cwd=REPO).returncode != 0:
            raise ShieldError(f"experiment: stage {stage.recipe} -> {stage.out} failed (see its output above)")
        write_json(stage.out / STAGE_FILE, {
            "recipe": stage.recipe, "args": stage.args, "seconds": time.perf_counter() - start, "code": code,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z") + f".{time.time_ns()}",
            "upstream": {str(d): self._stamp(d) for d in stage.depends}})

    def run(self) -> list[dict[str, Any]]:
        self.out.mkdir(parents=True, exist_ok=True)
        write_json(self.output("experiment.json"), {"config": asdict(self.cfg)})
        start = time.perf_counter()
        launched: set[Path] = set()
        # planned again after every stage: whether a LoRA arm shares an earlier one's training is known once
        # its identify and that training finished
        while (stage := next((s for s in self.plan() if s.out not in launched), None)) is not None:
            launched.add(stage.out)
            if stage.recipe == "train.py":
                self._share_benign_targets(stage.out)
            self.run_stage(stage)
        log.info("experiment stages took %.0f s", time.perf_counter() - start)
        return self.write_results()

    def _share_benign_targets(self, train_dir: Path) -> None:
        """The base model's answers to the benign training prompts are the same for every arm: the first
        arm generates them (`--benign-targets self`), the others start from its cache."""
        target = train_dir / BENIGN_TARGETS_FILE
        if target.exists():
            return
        for arm in self.arms():
            cache = arm.train_dir / BENIGN_TARGETS_FILE
            if cache.is_file() and arm.train_dir != train_dir:
                train_dir.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(cache, target)
                return

    # --- results -------------------------------------------------------------------------------
    def write_results(self) -> list[dict[str, Any]]:
        base_dir = self.base_eval_dir
        arms = self.arms()
        note = overlap_note([base_dir, *((a.same_as or a).eval_dir for a in arms)], self.cfg.allow_overlap)
        trained = (set(self.cfg.train_languages), set(self.cfg.train_modalities))
        rows = [arm_row("base", "base", None, base_dir, None, base_dir, trained)]
        rows += [self._arm_row(a, base_dir, trained) for a in arms]
        title = (f"Arms trained on languages {_csv(self.cfg.train_languages)} x modalities "
                 f"{_csv(self.cfg.train_modalities)}, evaluated on held-out {self.cfg.eval_split} prompts")
        if note:
            title += f" {note}"
        text = results_markdown(rows, title, model=self.cfg.model, tiny=is_tiny_checkpoint(self.cfg.model),
                                split=self.cfg.eval_split)
        safety = next((a for a in arms if a.name == "safety"), None)
        if safety is not None:
            held = held_out_groups(base_dir, trained)
            text += "\n" + transfer_section(base_dir, safety.eval_dir, held)
        comparisons = self.paired_comparisons(arms, base_dir, trained)
        if comparisons:
            text += "\n" + paired_markdown(comparisons, self.cfg.eval_split)
        plot = plot_results(rows, self.output("results.png"))
        if plot is not None:
            text += f"\n![ASR per arm]({plot.name})\n"
        if self.cfg.budgets:
            sweep = budget_rows(rows, self.main_budget(), self.cfg.sweep_random_seeds)
            text += "\n" + budget_markdown(sweep)
            figure = plot_budgets(sweep, self.output("budgets.png"))
            if figure is not None:
                text += f"\n![ASR and over-refusal against the trainable fraction]({figure.name})\n"
        if self.cfg.selections:
            text += "\n" + selection_markdown(selection_rows(rows, self.cfg.sweep_random_seeds), self.selection_sets())
        if self.cfg.curve_steps:
            curve = self.curve_rows(rows, base_dir, trained)
            text += "\n" + curve_markdown(curve, self.cfg.eval_split)
            figure = plot_curves(curve, self.output("curves.png"), self.cfg.eval_split)
            if figure is not None:
                text += f"\n![ASR against over-refusal along training]({figure.name})\n"
            write_text(self.output("curves.csv"), rows_to_csv(curve))
        write_text(self.output("results.md"), text)
        write_text(self.output("results.csv"), rows_to_csv(rows))
        print(text, flush=True)
        return rows

    @staticmethod
    def _arm_row(arm: Arm, base_dir: Path, trained: tuple[set[str], set[str]]) -> dict[str, Any]:
        source = arm.same_as or arm
        row = arm_row(arm.name, arm.kind, arm.budget, source.eval_dir, source.train_dir, base_dir, trained,
                      arm.selection)
        return dict(row, same_as=arm.same_as.name if arm.same_as else None)

    @staticmethod
    def paired_comparisons(arms: list[Arm], base_dir: Path, trained: tuple[set[str], set[str]]
                           ) -> list[tuple[str, str, dict[str, tuple[int, int, int]]]]:
        """Each safety arm against the base model and the other arms of its budget and selection (random
        seeds, LoRA, full FFN), prompt by prompt (`paired_counts`)."""
        read: dict[Path, dict[str, dict[tuple, bool]]] = {}  # each evaluation read once

        def counts(safety_dir: Path, control_dir: Path) -> dict[str, tuple[int, int, int]]:
            for d in (safety_dir, control_dir):
                if d not in read:
                    read[d] = prompt_outcomes(d, trained)
            return paired_counts(read[safety_dir], read[control_dir], (str(safety_dir), str(control_dir)))

        out = []
        for safety in (a for a in arms if a.kind == "safety"):
            out.append((safety.name, "base", counts(safety.eval_dir, base_dir)))
            for control in arms:
                if control.kind != "safety" and (control.budget, control.selection) == (safety.budget, safety.selection):
                    out.append((safety.name, control.name, counts(safety.eval_dir, (control.same_as or control).eval_dir)))
        return out

    def main_budget(self) -> float:
        """The main identify's parameter cap (its selected fraction when it had none)."""
        meta = NeuronSet.load(self.out / "identify").meta
        return float(meta.get("max_param_fraction") or meta["param_fraction"])

    def selection_sets(self) -> dict[str | None, dict[str, Any]]:
        """Per selection (None: the main one): its description, neuron count and neurons shared with the main set."""
        main = NeuronSet.load(self.out / "identify")
        out: dict[str | None, dict[str, Any]] = {}
        named = [(s.name, self.out / SELECTIONS_DIR / s.name / "identify") for s in self.cfg.parsed_selections()]
        for name, path in [(None, self.out / "identify"), *named]:
            found = NeuronSet.load(path)
            out[name] = {"description": describe_selection(found.meta), "neurons": found.count,
                         "shared": len(found.as_pairs() & main.as_pairs())}
        return out

    def curve_rows(self, rows: list[dict[str, Any]], base_dir: Path,
                   trained: tuple[set[str], set[str]]) -> list[dict[str, Any]]:
        """One row per main arm and step: the snapshots' evaluations, then the final one (and the base at 0)."""
        final = {r["arm"]: r for r in rows}
        steps = int(_flag_value(self.cfg.train_args, "--max-steps"))
        out = []
        for arm in (a for a in self.arms() if a.main):
            points = [(0, final["base"])]
            points += [(step, arm_row(arm.name, arm.kind, None, d, arm.train_dir, base_dir, trained))
                       for step, _, d in self.curve_points(arm)]
            points.append((steps, final[arm.name]))
            out += [{**row, "arm": arm.name, "kind": arm.kind, "step": step} for step, row in points]
        return out
