"""Recipe options: one schema for YAML presets and flags, CLI overrides, source lists, embedded defaults,
ds_config resolution."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys

import pytest

from shield_ds.cli import read_config
from shield_ds.engine import resolve_ds_config
from shield_ds.errors import ShieldError
from shield_ds.evaluate.evaluator import EvalConfig
from shield_ds.experiment import ExperimentConfig
from shield_ds.neurons.identify import IdentifyConfig
from shield_ds.train import TrainConfig

from conftest import REPO as REPO_ROOT
from conftest import assert_one_line_error

RECIPES = {"identify": IdentifyConfig, "train": TrainConfig, "evaluate": EvalConfig, "experiment": ExperimentConfig}


def load_recipe(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"recipe_{name}", REPO_ROOT / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse(cls, argv, **kwargs):
    return read_config(cls, [str(a) for a in argv], **kwargs)[0]


def test_yaml_presets_and_cli_overrides(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("harmful: [multijail]\nratio: 0.5\nper_group_limit: 3\nlanguages: en,zh\nmax-param-fraction: 1e-3\n")
    args = parse(IdentifyConfig, ["--config", cfg, "--model", "m"])
    assert args.harmful == ["multijail"] and args.ratio == 0.5 and args.per_group_limit == 3
    assert args.languages == ["en", "zh"] and args.max_param_fraction == 0.001  # YAML's "1e-3" string, as a flag
    # a CLI source list replaces the preset's; repeated flags accumulate
    args = parse(IdentifyConfig, ["--config", cfg, "--model", "m", "--harmful", "a.jsonl", "b.csv",
                                  "--harmful", "c.json", "--ratio", "0.2", "--languages", "vi"])
    assert args.harmful == ["a.jsonl", "b.csv", "c.json"] and args.ratio == 0.2 and args.languages == ["vi"]
    assert args.benign == ["multiq", "requests"]  # the default: questions + the shipped requests
    cfg.write_text("no_such_flag: 1\n")
    with pytest.raises(ShieldError, match="unknown key 'no_such_flag'"):
        parse(IdentifyConfig, ["--config", cfg])
    cfg.write_text("ratio: [1, 2]\n")
    with pytest.raises(ShieldError, match="ratio: expected one value, not a list"):
        parse(IdentifyConfig, ["--config", cfg])


def test_flag_spellings_aliases_and_lists():
    args = parse(TrainConfig, ["--model", "m", "--batch-size", "3", "--ds", "a=1", "--ds", "b=[1,2]", "--export-steps",
                               "1,2", "--no-export", "--resume", "--update", "lora", "--lora-targets", "q,v",
                               "--lora-budget", "match", "--local_rank=1", "--neurons", "random:7:runs/x"])
    assert args.micro_batch_size == 3 and args.ds_overrides == ["a=1", "b=[1,2]"] and args.export_steps == [1, 2]
    assert args.export is False and args.resume is True and args.lora_targets == ["q", "v"]
    assert args.neurons == "random:7:runs/x"
    assert parse(TrainConfig, ["--model", "m", "--micro-batch-size", "5"]).micro_batch_size == 5
    assert parse(TrainConfig, ["--model", "m", "--lora-targets", ""]).lora_targets is None
    exp = parse(ExperimentConfig, ["--budgets", "0.001,0.01", "--curve-steps", "10,20", "--arms", "safety,lora",
                                   "--train-args=--max-steps 40"])
    assert exp.budgets == [0.001, 0.01] and exp.curve_steps == [10, 20] and exp.arms == ["safety", "lora"]
    assert exp.train_args == "--max-steps 40"
    assert parse(EvalConfig, ["--model", "m", "--ds-config", "none"]).ds_config is None
    with pytest.raises(ShieldError, match="--ds-config none is for inference"):
        parse(TrainConfig, ["--model", "m", "--ds-config", "none"])


@pytest.mark.parametrize("flag, value, needle", [
    ("update", "bogus", "argument --update: invalid choice: 'bogus'"),
    ("export-steps", "1,x", "argument --export-steps/--export_steps: invalid int value: 'x'"),
    ("modalities", "text,audio", "argument --modalities: invalid choice: 'audio'"),
    ("lr", "fast", "argument --lr: invalid float value: 'fast'"),
    ("resume", "maybe", "argument --resume: "),
])
def test_yaml_and_flags_share_validation(tmp_path, capsys, flag, value, needle):
    """A bad value is the same one-line error with exit code 2 from a flag and from a YAML preset (which
    names its file)."""
    main = load_recipe("train").main
    with pytest.raises(SystemExit) as exc:
        main(["--model", "m", f"--{flag}", value])
    from_flag = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and from_flag.startswith("error: " + needle) and "\n" not in from_flag
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"{flag.replace('-', '_')}: '{value}'\n")
    with pytest.raises(SystemExit) as exc:
        main(["--model", "m", "--config", str(cfg)])
    from_yaml = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and from_yaml == f"error: {cfg}: " + from_flag[len("error: "):]


def test_library_construction_checks_choices():
    with pytest.raises(ShieldError, match="--update must be one of mask, delta, lora, full-ffn, not 'bogus'"):
        TrainConfig(model="m", update="bogus")
    with pytest.raises(ShieldError, match="--modalities must be one of .* not 'audio'"):
        IdentifyConfig(model="m", modalities=["text", "audio"])


def test_literals_match_the_library_tables():
    import typing

    from shield_ds.neurons.scores import SCORES
    from shield_ds.neurons.selection import CAP_RANKINGS

    hints = typing.get_type_hints(IdentifyConfig)
    assert typing.get_args(hints["score"]) == SCORES and typing.get_args(hints["cap_ranking"]) == CAP_RANKINGS


@pytest.mark.parametrize("recipe", ["identify", "train", "evaluate"])
def test_embedded_default_only_without_model_or_config(recipe):
    from shield_ds.defaults import default_model_dir

    args, where = read_config(RECIPES[recipe], [], embedded_default=recipe)
    assert args.per_group_limit is not None  # from configs/default/<recipe>.yaml (every key a real option)
    assert args.model == str(default_model_dir()) and f"recipe_defaults/{recipe}.yaml" in where  # configs/default links there
    args, where = read_config(RECIPES[recipe], ["--model", "x"], embedded_default=recipe)
    assert args.per_group_limit is None and where == "flags"


def _stage_args(exp: ExperimentConfig) -> dict[str, list[str]]:
    """The flag strings an experiment config passes to each stage recipe."""
    return {"identify": [exp.data_args, exp.identify_args], "evaluate": [exp.data_args, exp.evaluate_args,
                                                                       exp.base_evaluate_args],
            "train": [exp.data_args, exp.train_args, exp.lora_args]}


@pytest.mark.parametrize("path", sorted(p.relative_to(REPO_ROOT).as_posix() for p in (REPO_ROOT / "configs").rglob("*.yaml")))
def test_every_shipped_config_parses(path, monkeypatch):
    """Every YAML under configs/ parses with its recipe's options; an experiment's stage flags too."""
    monkeypatch.chdir(REPO_ROOT)
    name = path.split("/")[-1].removesuffix(".yaml")
    cls = RECIPES.get(name, ExperimentConfig)
    cfg = parse(cls, ["--config", path])
    if cls is ExperimentConfig:
        for recipe, texts in _stage_args(cfg).items():
            for text in texts:
                parse(RECIPES[recipe], ["--model", "m", *shlex.split(text)])


@pytest.mark.parametrize("script, flags, env", [
    ("identify.sh", "--languages en --modalities text --per-group-limit 4 --ratio 0.05 --max-param-fraction 0 "
                    "--batch-size 4 --harmful a.jsonl --harmful b.csv", {}),
    ("train_70b.sh", "--ds-config ds_configs/zero3_fp32.json --languages en --modalities text --per-group-limit 4 "
                     "--benign-targets self --max-new-tokens 8 --micro-batch-size 2 --max-steps 12 --save-every 1",
     {"RESUME": "1"}),
    ("train_7b.sh", "--model /models/m", {}),
    ("evaluate.sh", "--zero off --per-group-limit 2", {}),
])
def test_slurm_scripts_pass_known_flags(tmp_path, script, flags, env):
    """The flags an sbatch script passes (its defaults, the user's, --resume; DRY_RUN=1 prints the srun
    command) parse with the recipe's options, and the user's flags are the ones the recipe gets."""
    import os

    full = {**os.environ, "DRY_RUN": "1", "PYTHON": "python", **env}
    for key in [k for k in full if k.startswith("SLURM_")]:
        del full[key]
    user = [*shlex.split(flags), "--out", str(tmp_path / "out")]
    out = subprocess.run(["bash", f"slurm/{script}", *user], cwd=REPO_ROOT, env=full, capture_output=True,
                         text=True, timeout=60, check=True).stdout
    command = re.search(r"=== command: .* -u (recipes/\w+)\.py(.*)", out)
    recipe, args = command.group(1).split("/")[1], command.group(2).split()
    cfg = parse(RECIPES[recipe], args)
    assert cfg.out == str(tmp_path / "out")
    assert (tmp_path / "logs").is_dir()  # the job log sits beside the user's --out
    if "--max-steps" in user:
        assert cfg.max_steps == 12 and cfg.ds_config == "ds_configs/zero3_fp32.json" and cfg.resume


def test_every_option_is_declared_once():
    """Recipes only wire a config dataclass to the one parser (shield_ds/cli.py); the library never
    imports the parser. selfcheck.py keeps argparse (the tools' ToolParser): its --help must not import
    transformers."""
    recipes = sorted((REPO_ROOT / "recipes").glob("*.py"))
    for path in recipes:
        text = path.read_text()
        if path.name != "selfcheck.py":
            assert "add_argument(" not in text and "argparse" not in text, path.name
        assert len(text.splitlines()) < 40, f"{path.name}: {len(text.splitlines())} lines"
    for path in (REPO_ROOT / "shield_ds").rglob("*.py"):
        if path.name != "cli.py":
            imports = r"^\s*(from shield_ds\.cli import|import shield_ds\.cli|from shield_ds import .*\bcli\b)"
            assert not re.search(imports, path.read_text(), re.MULTILINE), path
    assert "add_argument(" not in (REPO_ROOT / "shield_ds" / "cli.py").read_text().split("class ConfigParser")[0]


def test_ds_config_batch_sizes_are_computed_and_auto_is_refused(tmp_path):
    cfg = resolve_ds_config("ds_configs/zero3_bf16.json", micro_batch_size=4, grad_accum=2, world_size=8, lr=3e-5,
                            overrides=["zero_optimization.offload_param.device=\"cpu\"", "gradient_clipping=0.5"])
    assert (cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"], cfg["train_batch_size"]) == (4, 2, 64)
    assert cfg["optimizer"]["params"]["lr"] == 3e-5 and cfg["gradient_clipping"] == 0.5
    assert cfg["zero_optimization"]["offload_param"]["device"] == "cpu"
    bad = tmp_path / "auto.json"
    bad.write_text('{"zero_optimization": {"stage": 3, "reduce_bucket_size": "auto"}}')
    with pytest.raises(ShieldError, match="reduce_bucket_size"):
        resolve_ds_config(bad, micro_batch_size=1)
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ShieldError, match="broken.json"):
        resolve_ds_config(tmp_path / "broken.json", micro_batch_size=1)


def test_split_flags_defaults_per_recipe_and_validation():
    defaults = {}
    for recipe in ("identify", "train", "evaluate"):
        args = parse(RECIPES[recipe], ["--model", "m"])
        defaults[recipe] = (args.split, args.test_fraction, args.split_seed)
    assert defaults == {"identify": ("train", 0.3, 0), "train": ("train", 0.3, 0), "evaluate": ("test", 0.3, 0)}
    args = parse(IdentifyConfig, ["--split", "test", "--test-fraction", "0.25", "--split-seed", "3"])
    assert (args.split, args.test_fraction, args.split_seed) == ("test", 0.25, 3)
    args = parse(IdentifyConfig, ["--split", "validation", "--validation-fraction", "0.1"])
    assert (args.split, args.validation_fraction) == ("validation", 0.1)
    with pytest.raises(ShieldError, match="argument --split: invalid choice: 'dev'"):
        parse(IdentifyConfig, ["--split", "dev"])


def test_adam_implementation_follows_the_machine(tmp_path):
    """Shipped configs leave the Adam kernel open: torch's on a CPU-only machine, DeepSpeed's fused one on
    GPUs; a config (or --ds override) that chooses keeps its choice."""
    import json

    import torch

    for path in sorted((REPO_ROOT / "ds_configs").glob("*.json")):  # offload too: DeepSpeed's CPU Adam on GPU nodes
        shipped = json.loads(path.read_text())
        assert "torch_adam" not in shipped.get("optimizer", {}).get("params", {}), path.name
    resolved = resolve_ds_config(REPO_ROOT / "ds_configs" / "zero3_bf16.json", micro_batch_size=1)
    assert resolved["optimizer"]["params"].get("torch_adam") is (True if not torch.cuda.is_available() else None)
    chosen = resolve_ds_config(REPO_ROOT / "ds_configs" / "zero3_bf16.json", micro_batch_size=1,
                               overrides=["optimizer.params.torch_adam=false"])
    assert chosen["optimizer"]["params"]["torch_adam"] is False


def test_fits_replicated_counts_the_checkpoint(tiny_checkpoint, tmp_path):
    import torch

    from shield_ds.engine import fits_replicated

    model = tiny_checkpoint("llava")
    assert fits_replicated(model, torch.float32)
    assert not fits_replicated(model, torch.float32, share=1e-15)  # a few hundred kB do not fit in ~0 bytes
    assert not fits_replicated(tmp_path, torch.float32)  # no safetensors: unknown size counts as not fitting


def test_choose_zero_resolves_auto_on_off(tiny_checkpoint, tmp_path):
    import torch

    from shield_ds.engine import choose_zero

    model, f32 = tiny_checkpoint("llava"), torch.float32
    zero3 = {"zero_optimization": {"stage": 3, "offload_param": {"device": "none"}}}
    offload = {"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}}
    assert choose_zero("auto", zero3, model, f32) == "off"  # 310k parameters fit anywhere
    assert choose_zero("on", zero3, model, f32) == "on" and choose_zero("off", zero3, model, f32) == "off"
    assert choose_zero("auto", None, model, f32) == "off"  # --ds-config none: plain PyTorch
    assert choose_zero("auto", offload, model, f32) == "on"  # offloading asks for ZeRO-3
    assert choose_zero("auto", zero3, tmp_path, f32) == "on"  # size unknown (no safetensors)
    assert choose_zero("auto", zero3, "no-such-org/no-such-model", f32) == "on"
    for zero, config, needle in (("on", None, "--zero on needs a DeepSpeed config"),
                                 ("off", offload, "cannot offload"), ("sometimes", zero3, "--zero must be")):
        with pytest.raises(ShieldError, match=needle):
            choose_zero(zero, config, model, f32)
    assert parse(EvalConfig, []).zero == "auto" and parse(IdentifyConfig, ["--zero", "off"]).zero == "off"
    assert not hasattr(parse(TrainConfig, []), "zero")
    with pytest.raises(ShieldError, match="unrecognized arguments: --zero off"):
        parse(TrainConfig, ["--zero", "off"])


TOOLS = ["shield_ds.models.convert", "shield_ds.models.tiny", "shield_ds.evaluate.rejudge", "shield_ds.report",
         "shield_ds.experiment.publish", "shield_ds.plan", "shield_ds.data.summary", "shield_ds.patch",
         "shield_ds.launch"]


@pytest.mark.parametrize("module", TOOLS)
def test_tools_usage_errors_are_one_line(module, capsys):
    """Every `python -m shield_ds....` tool answers an unknown flag with one line naming the tool and the
    flag, exit 2 (not argparse's usage block); a subcommand's missing option names the subcommand."""
    import importlib

    main = importlib.import_module(module + (".__main__" if module == "shield_ds.launch" else "")).main
    required = {  # the tool's required arguments, so that the unknown flag is the error
        "shield_ds.models.convert": ["--gguf", "g", "--out", "o"], "shield_ds.models.tiny": ["--arch", "llama", "--out", "o"],
        "shield_ds.evaluate.rejudge": ["d"], "shield_ds.report": ["--run", "r"],
        "shield_ds.experiment.publish": ["--run", "r", "--out", "o"], "shield_ds.patch": ["info", "--patch", "p"],
        "shield_ds.launch": ["show"],
    }.get(module, [])
    with pytest.raises(SystemExit) as exited:
        main([*required, "--bogus"])
    err = capsys.readouterr().err.strip()
    assert exited.value.code == 2 and "\n" not in err, err
    assert err.startswith(f"error: python -m {module}") and "unrecognized arguments: --bogus" in err, err


@pytest.mark.parametrize("args, names", [
    (["-m", "shield_ds.patch", "apply", "--base", "b"], ["python -m shield_ds.patch apply", "--patch", "--out"]),
    (["recipes/selfcheck.py", "--bogus"], ["python recipes/selfcheck.py", "--bogus"]),
    (["benchmarks/run.py", "--size", "huge"], ["python benchmarks/run.py", "--size", "'huge'"]),
    (["scripts/gpu_check.py", "--bogus"], ["python scripts/gpu_check.py", "--bogus"]),
])
def test_script_usage_errors_are_one_line(args, names):
    """The scripts outside the library (and a tool's subcommand) answer a usage error the same way."""
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert_one_line_error(proc, *names)
