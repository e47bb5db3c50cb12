"""Recipe flags: YAML presets, CLI overrides, source lists, embedded defaults, ds_config resolution."""

from __future__ import annotations

import argparse

import pytest

from shield_ds.config import add_data_args, add_engine_args, data_kwargs, parse_args
from shield_ds.engine import resolve_ds_config
from shield_ds.errors import ShieldError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None)
    p.add_argument("--ratio", type=float, default=0.01)
    add_data_args(p, modalities="text")
    add_engine_args(p, ds_config="ds_configs/zero3_infer.json", allow_none=True)
    return p


def test_yaml_presets_and_cli_overrides(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("harmful: [multijail]\nratio: 0.5\nper_group_limit: 3\n")
    args = parse_args(_parser(), ["--config", str(cfg), "--model", "m"])
    assert args.harmful == ["multijail"] and args.ratio == 0.5 and args.per_group_limit == 3
    # a CLI source list replaces the preset's; repeated flags accumulate
    args = parse_args(_parser(), ["--config", str(cfg), "--model", "m", "--harmful", "a.jsonl", "b.csv",
                                  "--harmful", "c.json", "--ratio", "0.2"])
    assert args.harmful == ["a.jsonl", "b.csv", "c.json"] and args.ratio == 0.2
    assert data_kwargs(args)["benign"] == ["multiq"]
    cfg.write_text("no_such_flag: 1\n")
    with pytest.raises(ShieldError, match="unknown key 'no_such_flag'"):
        parse_args(_parser(), ["--config", str(cfg)])


@pytest.mark.parametrize("recipe", ["identify", "train", "evaluate"])
def test_embedded_default_only_without_model_or_config(recipe):
    import importlib.util

    from conftest import REPO

    spec = importlib.util.spec_from_file_location(f"recipe_{recipe}", REPO / "recipes" / f"{recipe}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = parse_args(module.build_parser(), [], embedded_default=recipe)
    assert args.per_group_limit is not None  # from configs/default/<recipe>.yaml (every key a real flag)
    args = parse_args(module.build_parser(), ["--model", "x"], embedded_default=recipe)
    assert args.per_group_limit is None


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


@pytest.mark.parametrize("config", ["demo/identify", "demo/train", "demo/evaluate", "experiment"])
def test_shipped_configs_name_real_flags(config):
    import importlib.util

    from conftest import REPO

    recipe = config.split("/")[-1]
    spec = importlib.util.spec_from_file_location(f"recipe_{recipe}_cfg", REPO / "recipes" / f"{recipe}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    parse_args(module.build_parser(), ["--config", str(REPO / "configs" / f"{config}.yaml")])


def test_split_flags_defaults_per_recipe_and_validation(capsys):
    import importlib.util

    from conftest import REPO

    defaults = {}
    for recipe in ("identify", "train", "evaluate"):
        spec = importlib.util.spec_from_file_location(f"recipe_{recipe}_split", REPO / "recipes" / f"{recipe}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        kwargs = data_kwargs(parse_args(module.build_parser(), ["--model", "m"]))
        defaults[recipe] = (kwargs["split"], kwargs["test_fraction"], kwargs["split_seed"])
    assert defaults == {"identify": ("train", 0.3, 0), "train": ("train", 0.3, 0), "evaluate": ("test", 0.3, 0)}
    kwargs = data_kwargs(parse_args(_parser(), ["--split", "test", "--test-fraction", "0.25", "--split-seed", "3"]))
    assert (kwargs["split"], kwargs["test_fraction"], kwargs["split_seed"]) == ("test", 0.25, 3)
    assert data_kwargs(parse_args(_parser(), []))["split"] == "all"  # add_data_args' own default
    with pytest.raises(SystemExit) as exc:
        parse_args(_parser(), ["--split", "validation"])
    assert exc.value.code == 2 and "validation" in capsys.readouterr().err


def test_adam_implementation_follows_the_machine(tmp_path):
    """Shipped configs leave the Adam kernel open: torch's on a CPU-only machine, DeepSpeed's fused one on
    GPUs; a config (or --ds override) that chooses keeps its choice."""
    import json

    import torch

    from conftest import REPO

    for path in sorted((REPO / "ds_configs").glob("*.json")):  # offload too: DeepSpeed's CPU Adam on GPU nodes
        shipped = json.loads(path.read_text())
        assert "torch_adam" not in shipped.get("optimizer", {}).get("params", {}), path.name
    resolved = resolve_ds_config(REPO / "ds_configs" / "zero3_bf16.json", micro_batch_size=1)
    assert resolved["optimizer"]["params"].get("torch_adam") is (True if not torch.cuda.is_available() else None)
    chosen = resolve_ds_config(REPO / "ds_configs" / "zero3_bf16.json", micro_batch_size=1,
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
    inference, training = argparse.ArgumentParser(), argparse.ArgumentParser()
    add_engine_args(inference, ds_config="x.json", allow_none=True, inference=True)
    add_engine_args(training, ds_config="x.json", allow_none=False)
    assert inference.parse_args([]).zero == "auto" and inference.parse_args(["--zero", "off"]).zero == "off"
    assert not hasattr(training.parse_args([]), "zero")
