"""Stage 2: masked training on 2 CPU ranks under ZeRO-3; export, patch, resume, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, assert_one_line_error, child_env, run_deepspeed, run_python, timeout_above
from identify_helpers import write_jsonl
from shield_ds.neurons import NeuronSet
from shield_ds.neurons.identify import IdentifyConfig, Identifier

TRAIN = str(REPO / "recipes" / "train.py")
EVALUATE = str(REPO / "recipes" / "evaluate.py")
pytestmark = pytest.mark.distributed
MASK_RUN = 600  # timeout of the mask_run fixture's launch (in the marks of the tests that may build it)


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "model.safetensors"))


@pytest.fixture(scope="module")
def setup(tiny_checkpoint, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    model = tiny_checkpoint("llava")
    neurons = tmp / "identify"
    cfg = IdentifyConfig(model=str(model), languages=["en", "zh"], modalities=["text"], per_group_limit=6, ratio=0.05,
                         max_param_fraction=0.0, out=str(neurons), ds_config=None)
    ns = Identifier(cfg).run()
    assert ns.count >= 8
    benign = write_jsonl(tmp / "benign.jsonl", [
        {"id": f"b{i}", "prompt": q, "language": lang, "label": "benign", "response": a}
        for i, (q, a, lang) in enumerate([("What is 2+2?", "4.", "en"), ("Name a primary colour.", "Red.", "en"),
                                          ("水的化学式是什么？", "H2O。", "zh"), ("天空是什么颜色？", "蓝色。", "zh")])])
    return {"model": model, "neurons": neurons, "benign": benign, "tmp": tmp}


def _args(s: dict, out: Path, *extra: str) -> list[str]:
    return ["--model", str(s["model"]), "--neurons", str(s["neurons"]), "--benign", str(s["benign"]),
            "--languages", "en,zh", "--per-group-limit", "4", "--micro-batch-size", "2", "--grad-accum", "2",
            "--max-steps", "4", "--lr", "1e-3", "--ds-config", "ds_configs/zero3_fp32.json", "--out", str(out),
            "--save-every", "1", *extra]


@pytest.fixture(scope="module")
def mask_run(setup) -> Path:
    out = setup["tmp"] / "mask"
    run_deepspeed(TRAIN, _args(setup, out, "--export-steps", "2"), num_ranks=2, timeout=MASK_RUN)
    return out


def _assert_only_slices_changed(base: dict, trained: dict, ns: NeuronSet) -> int:
    """Every selected slice changed, nothing else did; returns the number of changed entries."""
    assert base.keys() == trained.keys()
    changed = 0
    for key, before in base.items():
        after = trained[key]
        assert after.dtype == before.dtype and after.shape == before.shape
        diff = before != after
        changed += int(diff.sum())
        if ".mlp." in key and "language_model" in key and "layers." in key:
            layer = int(key.split("layers.")[1].split(".")[0])
            idx = ns.indices(layer)
            inside = torch.zeros_like(diff)
            if "down_proj" in key:
                inside[:, idx] = True
            else:
                inside[idx] = True
            assert not diff[~inside].any(), f"{key}: weights outside the selected neurons moved"
            # every selected slice changed (each selected row / column, not just some entries)
            slices = diff[:, idx].any(0) if "down_proj" in key else diff[idx].any(1)
            assert slices.all(), f"{key}: a selected slice did not change"
        else:
            assert not diff.any(), f"{key} moved"
    return changed


def test_only_selected_slices_change(setup, mask_run):
    ns = NeuronSet.load(setup["neurons"])
    base, trained = _weights(setup["model"]), _weights(mask_run / "model")
    changed = _assert_only_slices_changed(base, trained, ns)
    total = sum(t.numel() for t in base.values())
    assert 0 < changed / total <= ns.param_fraction
    summary = json.loads((mask_run / "train.json").read_text())
    assert summary["steps"] == 4 and summary["world_size"] == 2
    assert summary["arm"] == "safety" and summary["patch"] == "shield_patch.safetensors"
    assert summary["trainable_params"] == _slice_params(base, ns) and summary["train_seconds"] > 0
    assert summary["trainable_fraction"] == summary["trainable_params"] / summary["total_params"]


@timeout_above(MASK_RUN, 300, 300, 300)
def test_patch_reproduces_export_and_refuses_other_base(setup, mask_run, tiny_checkpoint, tmp_path):
    out = tmp_path / "applied"
    run_python(["-m", "shield_ds.patch", "apply", "--base", str(setup["model"]), "--patch",
                str(mask_run / "shield_patch.safetensors"), "--out", str(out)], timeout=300)
    for f in (mask_run / "model").iterdir():
        assert (out / f.name).read_bytes() == f.read_bytes(), f.name
    # Another base: same architecture, other weights (seed), and another architecture.
    from shield_ds.models.tiny import build_tiny

    other = build_tiny("llava", tmp_path / "other", seed=1)
    for base in (other, tiny_checkpoint("qwen2_vl")):
        proc = run_python(["-m", "shield_ds.patch", "apply", "--base", str(base), "--patch",
                           str(mask_run / "shield_patch.safetensors"), "--out", str(tmp_path / "bad")],
                          check=False, timeout=300)
        assert_one_line_error(proc, "another base model")
        assert not (tmp_path / "bad").exists()


@timeout_above(MASK_RUN, 300, 300, 300, 300)
def test_trained_prompts_are_recorded_and_evaluating_them_is_refused(setup, mask_run, tmp_path):
    from shield_ds.data.splits import OVERLAP_NOTE, PROVENANCE_FILE, keys_digest, read_provenance

    summary = json.loads((mask_run / "train.json").read_text())
    prov = read_provenance(mask_run / "model")
    assert (mask_run / "model" / PROVENANCE_FILE).is_file()  # reproduced by `patch apply` (test above)
    assert (prov["split"], prov["test_fraction"], prov["split_seed"]) == ("train", 0.3, 0) == \
        (summary["split"], summary["test_fraction"], summary["split_seed"])
    assert prov["languages"] == ["en", "zh"] and prov["modalities"] == ["text"]
    keys = prov["trained_prompt_keys"]
    assert prov["prompt_key_digest"] == summary["prompt_key_digest"] == keys_digest(keys)
    trained_harmful = [k for k in keys if k.startswith("multijail:")]
    assert 0 < len(trained_harmful) <= 8 and {k.split(":")[0] for k in keys} == {"multijail", "benign"}
    # the same data flags as training: the default test split shares no prompt, the train split is refused
    ev = [EVALUATE, "--model", str(mask_run / "model"), "--languages", "en,zh", "--modalities", "text",
          "--per-group-limit", "4", "--max-new-tokens", "4", "--batch-size", "16", "--ds-config", "none"]
    run_python([*ev, "--out", str(tmp_path / "test")], timeout=300)
    asr = json.loads((tmp_path / "test" / "asr.json").read_text())
    assert (asr["split"], asr["trained_overlap"]) == ("test", 0) and asr["prompt_keys"] > 0
    compare = ["--split", "train", "--out", str(tmp_path / "train"), "--compare", str(tmp_path / "test")]
    proc = run_python([*ev, *compare], check=False, timeout=300)
    assert_one_line_error(proc, f"trained on {len(trained_harmful)} of the evaluated prompts")
    assert not (tmp_path / "train").exists()
    run_python([*ev, *compare, "--allow-overlap"], timeout=300)
    # a validation split comes out of the train split: a model trained without one was trained on some of its
    # prompts, and evaluating all of them is refused the same way (before any generation)
    from shield_ds.data.splits import split_of

    in_validation = [k for k in trained_harmful if split_of(k, 0.3, 0, 0.5) == "validation"]
    assert in_validation
    unlimited = [a for i, a in enumerate(ev) if "--per-group-limit" not in ev[i - 1:i + 1]]
    proc = run_python([*unlimited, "--split", "validation", "--validation-fraction", "0.5", "--out",
                       str(tmp_path / "validation"), "--compare", str(tmp_path / "test")], check=False, timeout=300)
    assert_one_line_error(proc, f"trained on {len(in_validation)} of the evaluated prompts")
    assert not (tmp_path / "validation").exists()
    asr = json.loads((tmp_path / "train" / "asr.json").read_text())
    assert (asr["split"], asr["trained_overlap"]) == ("train", len(trained_harmful))
    assert OVERLAP_NOTE in (tmp_path / "train" / "compare.md").read_text()


@timeout_above(MASK_RUN, 600)
def test_delta_mode_equals_mask_mode(setup, mask_run):
    out = setup["tmp"] / "delta"
    run_deepspeed(TRAIN, _args(setup, out, "--update", "delta"), num_ranks=2, timeout=600)
    a, b = _weights(mask_run / "model"), _weights(out / "model")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-7, msg=key)


@timeout_above(600, 600)
def test_delta_mode_is_bit_identical_to_mask_mode_with_sgd(setup):
    """A user's own ds_config (SGD with momentum and L2 decay, no clipping): both modes export the same bytes
    (delta mode with activation checkpointing: the recomputed forward is the same arithmetic)."""
    ds = json.loads((REPO / "ds_configs" / "zero3_fp32.json").read_text())
    ds["optimizer"] = {"type": "SGD", "params": {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.01}}
    ds["gradient_clipping"] = 0.0
    ds["zero_allow_untested_optimizer"] = True
    config = setup["tmp"] / "sgd.json"
    config.write_text(json.dumps(ds))
    outs = {}
    for mode in ("mask", "delta"):
        outs[mode] = setup["tmp"] / f"sgd-{mode}"
        extra = ["--gradient-checkpointing"] if mode == "delta" else []
        run_deepspeed(TRAIN, _args(setup, outs[mode], "--update", mode, "--ds-config", str(config), "--lr", "0.05",
                                   *extra), num_ranks=2, timeout=600)
    mask, delta = _weights(outs["mask"] / "model"), _weights(outs["delta"] / "model")
    base = _weights(setup["model"])
    assert any(not torch.equal(mask[k], base[k]) for k in base)
    for key in mask:
        assert torch.equal(mask[key], delta[key]), key
    patches = [load_file(str(outs[m] / "shield_patch.safetensors")) for m in ("mask", "delta")]
    assert patches[0].keys() == patches[1].keys()
    assert all(torch.equal(patches[0][k], patches[1][k]) for k in patches[0])


@timeout_above(MASK_RUN, 600)
def test_snapshot_is_what_a_shorter_run_exports(setup, mask_run):
    """--export-steps 2 of the 4-step run writes the patch and model a 2-step run exports, byte for byte,
    and the run goes on to its own final export."""
    out = setup["tmp"] / "two-steps"
    run_deepspeed(TRAIN, _args(setup, out, "--max-steps", "2"), num_ranks=2, timeout=600)
    snapshot = mask_run / "snapshots" / "step-2"
    a, b = load_file(str(snapshot / "shield_patch.safetensors")), load_file(str(out / "shield_patch.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    a, b, final = _weights(snapshot / "model"), _weights(out / "model"), _weights(mask_run / "model")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], final[k]) for k in a)
    assert sorted(p.name for p in (mask_run / "snapshots").iterdir()) == ["step-2"]


@timeout_above(MASK_RUN, 600, 600)
def test_kill_minus_9_then_resume_is_bit_identical(setup, mask_run):
    out = setup["tmp"] / "killed"
    proc = run_deepspeed(TRAIN, _args(setup, out), num_ranks=2, timeout=600, check=False,
                         env=child_env(SHIELD_DS_FAULT_KILL="1:2"))
    assert proc.returncode != 0
    assert not (out / "model").exists()
    done = sorted(p.name for p in (out / "checkpoints").iterdir() if (p / "COMPLETE").exists())
    assert done and done[-1] == "step-00000002", done
    run_deepspeed(TRAIN, _args(setup, out, "--resume"), num_ranks=2, timeout=600)
    a, b = _weights(mask_run / "model"), _weights(out / "model")
    for key in a:
        assert torch.equal(a[key], b[key]), key


@timeout_above(MASK_RUN, 300, 600)
def test_resume_refuses_other_settings_unless_forced(setup, mask_run, tmp_path):
    """A resume with another lr from a 2-rank run's checkpoint is refused in one line that names lr (from one
    process with the same global batch, which alone would be allowed); --resume-force continues with it."""
    out = tmp_path / "run"
    shutil.copytree(mask_run / "checkpoints", out / "checkpoints")
    shutil.rmtree(out / "checkpoints" / "step-00000004")  # resume from step 3: one step left
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    # one rank with grad-accum 4: the global batch of the saved run (2 x 2 ranks x 2)
    proc = run_python([TRAIN, *_args(setup, out, "--resume", "--grad-accum", "4", "--lr", "2e-3")], check=False,
                      timeout=300)
    line = assert_one_line_error(proc, "step-00000003", "lr (0.001 -> 0.002)", "--resume-force")
    assert "global_batch_size" not in line and line.count(" -> ") == 1, line
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    proc = run_deepspeed(TRAIN, _args(setup, out, "--resume", "--resume-force", "--lr", "2e-3"), num_ranks=2,
                         timeout=600)
    text = proc.stdout + proc.stderr
    assert "--resume-force: resuming although checkpoint" in text and "lr (0.001 -> 0.002)" in text, text[-3000:]
    assert json.loads((out / "train.json").read_text())["steps"] == 4
    base, forced, plain = _weights(setup["model"]), _weights(out / "model"), _weights(mask_run / "model")
    _assert_only_slices_changed(base, forced, NeuronSet.load(setup["neurons"]))
    assert any(not torch.equal(forced[key], plain[key]) for key in plain)  # step 4 took the new lr


def test_resume_fingerprint_names_what_changes_the_result(tmp_path):
    from shield_ds.engine import resolve_ds_config
    from shield_ds.errors import ShieldError
    from shield_ds.train import TrainConfig, check_resume, fingerprint_differences, run_fingerprint

    adamw = {"optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.1}},
             "zero_optimization": {"stage": 3}}

    def fingerprint(world: int = 2, micro: int = 2, accum: int = 2, ds: dict = adamw, neurons: str = "n",
                    **fields) -> dict:
        cfg = TrainConfig(model="m", micro_batch_size=micro, grad_accum=accum, **fields)
        resolved = resolve_ds_config(ds, micro_batch_size=micro, grad_accum=accum, world_size=world, lr=cfg.lr)
        return run_fingerprint(cfg, resolved, world, model_config_hash="c", neuron_set_digest=neurons,
                               data_digest="d")

    saved = fingerprint()
    offload = {**adamw, "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}
    same = [fingerprint(world=1, accum=4), fingerprint(world=4, micro=1, accum=2), fingerprint(lr=1e-3),
            fingerprint(out="elsewhere", save_every=5, keep_last=1, export=False, gradient_checkpointing=True,
                        resume=True, resume_force=True, ds_config="other.json", ds_overrides=["a=1"]),
            fingerprint(ds=offload)]
    # a checkpoint written before an option existed ran with its default
    older = {k: v for k, v in saved.items() if k not in ("validation_fraction", "benign_per_group_limit")}
    for now in same:
        assert fingerprint_differences(saved, now) == []
    assert fingerprint_differences(older, saved) == []
    changed = [(fingerprint(validation_fraction=0.1), "validation_fraction (0.0 -> 0.1)"),
               (fingerprint(benign_per_group_limit=8), "benign_per_group_limit (null -> 8)"),(fingerprint(lr=2e-3), "lr (0.001 -> 0.002)"), (fingerprint(world=1), "global_batch_size (8 -> 4)"),
               (fingerprint(languages=["en"]), "languages (null -> [\"en\"])"),
               (fingerprint(neurons="other"), "neuron_set_digest"), (fingerprint(max_steps=9), "max_steps"),
               (fingerprint(update="delta"), "update"), (fingerprint(split_seed=1), "split_seed"),
               (fingerprint(ds={**adamw, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}),
                "ds_config.optimizer.params.weight_decay (0.1 -> null)")]
    for now, name in changed:
        differences = fingerprint_differences(saved, now)
        assert len(differences) == 1 and differences[0].startswith(name), differences
    # a checkpoint without recorded settings: refused unless forced
    with pytest.raises(ShieldError, match="no record of its run's settings"):
        check_resume(tmp_path, saved, False, world_size=2)
    check_resume(tmp_path, saved, True, world_size=2)
    # the same settings at another world size: DeepSpeed's limit, one line (also when forced), unless universal
    from shield_ds.engine import RUN_INFO_FILE

    (tmp_path / RUN_INFO_FILE).write_text(json.dumps({"fingerprint": saved, "world_size": 2}))
    check_resume(tmp_path, fingerprint(world=1, accum=4), False, world_size=1, universal=True)
    for force in (False, True):
        with pytest.raises(ShieldError, match="saved by 2 ranks and this run has 1") as exc:
            check_resume(tmp_path, fingerprint(world=1, accum=4), force, world_size=1)
        assert "\n" not in str(exc.value)


@timeout_above(MASK_RUN, 300, 300, 300)
def test_bad_input_one_line_error_and_outputs_untouched(setup, mask_run, tiny_checkpoint, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(mask_run, out, ignore=shutil.ignore_patterns("checkpoints"))
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    base = ["--ds-config", "ds_configs/zero3_fp32.json", "--out", str(out), "--max-steps", "1"]
    # 1. a neuron set identified on another model
    proc = run_python([TRAIN, "--model", str(tiny_checkpoint("gemma3")), "--neurons", str(setup["neurons"]), *base],
                      check=False, timeout=300)
    assert_one_line_error(proc, "neuron set")
    # 2. an empty training set
    empty = write_jsonl(tmp_path / "empty.jsonl", [])
    proc = run_python([TRAIN, "--model", str(setup["model"]), "--neurons", str(setup["neurons"]),
                       "--harmful", str(empty), "--benign", str(empty), *base], check=False, timeout=300)
    assert_one_line_error(proc, "empty")
    # 3. benign records without responses and no --benign-targets
    proc = run_python([TRAIN, "--model", str(setup["model"]), "--neurons", str(setup["neurons"]),
                       "--languages", "en", "--per-group-limit", "2", *base], check=False, timeout=300)
    assert_one_line_error(proc, "--benign-targets self")
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before


# --- baseline arms: random neurons, LoRA, full FFN ---------------------------------------------------
LORA_LEAVES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _arm_args(s: dict, out: Path, *extra: str) -> list[str]:
    """Like _args, without --neurons (full-ffn and --lora-rank refuse it) and with 2 steps."""
    return ["--model", str(s["model"]), "--benign", str(s["benign"]), "--languages", "en,zh", "--per-group-limit", "4",
            "--micro-batch-size", "2", "--max-steps", "2", "--lr", "1e-2", "--ds-config", "ds_configs/zero3_fp32.json",
            "--out", str(out), *extra]


def _lm_keys(weights: dict, leaves: tuple[str, ...]) -> set[str]:
    """Language-model decoder-layer weights whose projection is one of `leaves` (never the vision tower)."""
    return {k for k in weights if "language_model" in k and ".layers." in k and k.endswith(".weight")
            and k.split(".")[-2] in leaves}


def _changed(base: dict, trained: dict) -> set[str]:
    assert base.keys() == trained.keys()
    for key in base:
        assert trained[key].dtype == base[key].dtype and trained[key].shape == base[key].shape, key
    return {k for k in base if not torch.equal(base[k], trained[k])}


def _assert_provenance(out: Path) -> None:
    """model/ carries shield_provenance.json: the prompt keys the arm trained on, with train.json's digest."""
    from shield_ds.data.splits import PROVENANCE_FILE, keys_digest, read_provenance

    summary = json.loads((out / "train.json").read_text())
    assert (out / "model" / PROVENANCE_FILE).is_file()
    prov = read_provenance(out / "model")
    keys = prov["trained_prompt_keys"]
    assert {k.split(":")[0] for k in keys} == {"multijail", "benign"}
    assert prov["prompt_key_digest"] == summary["prompt_key_digest"] == keys_digest(keys)
    assert len(keys) == summary["prompt_keys"] and prov["languages"] == ["en", "zh"]
    assert (prov["split"], prov["split_seed"]) == (summary["split"], summary["split_seed"]) == ("train", 0)


def _assert_merged_snapshot(out: Path, base: dict, trained: dict, moved: set[str]) -> None:
    """--export-steps 1 of a 2-step LoRA / full-FFN run: snapshots/step-1 holds a merged model/ (no patch) in
    which the same tensors moved, but not as far as the final export; it also carries the provenance."""
    from shield_ds.data.splits import PROVENANCE_FILE

    snapshot = out / "snapshots" / "step-1"
    assert not (snapshot / "shield_patch.safetensors").exists() and (snapshot / "model" / PROVENANCE_FILE).is_file()
    step1 = _weights(snapshot / "model")
    assert _changed(base, step1) == moved and _changed(step1, trained) == moved


def _slice_params(base: dict, ns: NeuronSet) -> int:
    hidden = next(v for k, v in base.items() if k.endswith("layers.0.mlp.gate_proj.weight")).shape[1]
    return ns.count * 3 * hidden  # gate row + up row + down column (the tiny llava has no MLP bias)


def test_random_arm_same_counts_other_neurons(setup):
    from shield_ds.patch import read_patch

    like = NeuronSet.load(setup["neurons"])
    drawn = NeuronSet.random_like(like, 3)
    assert drawn.per_layer_counts() == like.per_layer_counts() and drawn.as_pairs() != like.as_pairs()
    assert NeuronSet.random_like(like, 3).as_pairs() == drawn.as_pairs()
    assert NeuronSet.random_like(like, 4).as_pairs() != drawn.as_pairs()
    out = setup["tmp"] / "random"
    run_deepspeed(TRAIN, _arm_args(setup, out, "--neurons", f"random:3:{setup['neurons']}"), num_ranks=2, timeout=600)
    base, trained = _weights(setup["model"]), _weights(out / "model")
    _assert_only_slices_changed(base, trained, drawn)  # the drawn slices moved, every other weight is the base's
    summary = json.loads((out / "train.json").read_text())
    assert summary["arm"] == "random" and summary["random"] == {"seed": 3, "like": str(setup["neurons"])}
    assert summary["neurons"] == like.count and summary["trainable_params"] == _slice_params(base, like)
    entries, meta = read_patch(out / "shield_patch.safetensors")
    assert meta["arm"] == "random" and meta["random"] == summary["random"]
    for entry in entries:
        assert torch.equal(entry.indices, drawn.indices(int(entry.name.split("layers.")[1].split(".")[0])))
    _assert_provenance(out)


def test_lora_arm_matched_budget_merged_export(setup):
    from transformers import AutoModelForImageTextToText

    out = setup["tmp"] / "lora"
    run_deepspeed(TRAIN, _arm_args(setup, out, "--update", "lora", "--lora-budget", "match", "--neurons",
                                   str(setup["neurons"]), "--export-steps", "1"), num_ranks=2, timeout=600)
    base, trained = _weights(setup["model"]), _weights(out / "model")
    summary = json.loads((out / "train.json").read_text())
    lora, budget = summary["lora"], _slice_params(base, NeuronSet.load(setup["neurons"]))
    targets = _lm_keys(base, LORA_LEAVES)
    step = sum(base[k].shape[0] + base[k].shape[1] for k in targets)  # trainable parameters per unit of rank
    assert lora["params_per_rank"] == step and summary["trainable_params"] == lora["rank"] * step
    assert abs(summary["trainable_params"] - budget) <= step  # within one rank-step of the neuron count ...
    assert all(abs(r * step - budget) >= abs(lora["rank"] * step - budget) for r in range(1, lora["rank"] + 3))
    assert summary["arm"] == "lora" and summary["patch"] is None and not (out / "shield_patch.safetensors").exists()
    assert lora["alpha"] == 2 * lora["rank"]
    # Only the LoRA target matrices moved, each by a matrix of rank <= r; the rest is bit-identical.
    assert _changed(base, trained) == targets
    for key in targets:
        assert torch.linalg.matrix_rank(trained[key].double() - base[key].double(), rtol=1e-4) <= lora["rank"], key
    model, info = AutoModelForImageTextToText.from_pretrained(out / "model", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    _assert_provenance(out)
    _assert_merged_snapshot(out, base, trained, targets)


def test_full_ffn_arm_changes_only_ffn_tensors(setup):
    out = setup["tmp"] / "full-ffn"
    run_deepspeed(TRAIN, _arm_args(setup, out, "--update", "full-ffn", "--export-steps", "1"), num_ranks=2, timeout=600)
    base, trained = _weights(setup["model"]), _weights(out / "model")
    ffn = _lm_keys(base, ("gate_proj", "up_proj", "down_proj"))
    assert _changed(base, trained) == ffn
    summary = json.loads((out / "train.json").read_text())
    assert summary["arm"] == "full-ffn" and summary["patch"] is None and summary["neurons"] is None
    assert summary["trainable_params"] == sum(base[k].numel() for k in ffn)
    assert summary["trainable_fraction"] == summary["trainable_params"] / summary["total_params"]
    _assert_provenance(out)
    _assert_merged_snapshot(out, base, trained, ffn)


def test_arm_flags_bad_input(setup, tmp_path):
    """Flags of another arm, bad random specs, missing or foreign sets: one line, exit 2, nothing written."""
    from shield_ds.errors import ShieldError
    from shield_ds.train import ShieldTrainer, TrainConfig

    neurons = str(setup["neurons"])
    foreign = tmp_path / "foreign"
    shutil.copytree(neurons, foreign)
    meta = json.loads((foreign / "neurons.json").read_text())
    meta["config_hash"] = "0" * 64
    (foreign / "neurons.json").write_text(json.dumps(meta))
    out = tmp_path / "out"
    cases = [
        (dict(update="lora", neurons="random:1", lora_budget="match"), "neuron arms"),
        (dict(update="lora", lora_rank=4, neurons=neurons), "ignores --neurons"),
        (dict(update="lora"), "--lora-rank R or --lora-budget match"),
        (dict(update="lora", lora_budget="match", neurons=str(tmp_path / "none")), "--lora-budget match needs a neuron set"),
        (dict(update="mask", neurons=neurons, lora_rank=4), "--lora-rank is only for --update lora"),
        (dict(update="full-ffn", lora_alpha=8.0), "--lora-alpha is only for --update lora"),
        (dict(update="full-ffn", neurons=neurons), "full-ffn"),
        (dict(neurons=neurons, like_neurons=neurons), "--like-neurons is only for"),
        (dict(neurons="random:x"), "SEED a non-negative integer"),
        (dict(neurons="random:-1"), "SEED a non-negative integer"),
        (dict(neurons=f"random:1:{tmp_path / 'none'}"), "not found"),
        (dict(neurons=f"random:1:{foreign}"), "another model"),
        (dict(neurons="random:1", like_neurons=str(foreign)), "another model"),
        (dict(neurons=neurons, update="delta", export_steps=[1]), "--export-steps needs the export of --update mask"),
        (dict(neurons=neurons, export_steps=[0]), "--export-steps: step 0"),
    ]
    for kwargs, needle in cases:
        cfg = TrainConfig(model=str(setup["model"]), benign=[str(setup["benign"])], languages=["en"], out=str(out), **kwargs)
        with pytest.raises(ShieldError) as exc:
            ShieldTrainer(cfg).prepare()
        assert needle in str(exc.value) and "\n" not in str(exc.value), (kwargs, str(exc.value))
    proc = run_python([TRAIN, *_arm_args(setup, out, "--update", "lora", "--lora-rank", "2", "--neurons", "random:1")],
                      check=False, timeout=300)
    assert_one_line_error(proc, "neuron arms")
    assert not out.exists()


def test_self_targets_cut_at_sentence_end_and_left_open(setup, tmp_path):
    """An answer that hit --max-new-tokens is cut back to its last sentence end and trained without end of turn."""
    from shield_ds.data import SafetyCollator
    from shield_ds.data.records import SafetyRecord
    from shield_ds.data.targets import cut_at_sentence_end
    from shield_ds.models import load_model

    assert cut_at_sentence_end("Water boils at 100 degrees. At high alti") == "Water boils at 100 degrees."
    assert cut_at_sentence_end("Pi is 3.14 and e.g") is None  # decimals and abbreviations are no sentence end
    assert cut_at_sentence_end('He said "stop." Then') == 'He said "stop."'
    assert cut_at_sentence_end("水在100度沸腾。在高") == "水在100度沸腾。"
    assert cut_at_sentence_end("আমি ভালো আছি। তুমি") == "আমি ভালো আছি।"
    assert cut_at_sentence_end("Really?! Yes") == "Really?!" and cut_at_sentence_end("no end at all") is None
    assert cut_at_sentence_end(". and then") is None
    loaded = load_model(setup["model"])
    collator = SafetyCollator(loaded.processor, loaded.adapter, train=True)
    tokenizer = loaded.processor.tokenizer
    labels = {}
    for open_end in (False, True):
        record = SafetyRecord(id="b", prompt="Why is the sky blue?", language="en", label="benign",
                              response="Because of Rayleigh scattering.", response_open=open_end)
        batch = collator([record])
        labels[open_end] = batch.labels[batch.labels != -100].tolist()
    assert tokenizer.decode(labels[True]).strip() == "Because of Rayleigh scattering."
    assert labels[False][:len(labels[True])] == labels[True] and len(labels[False]) > len(labels[True])
    # The trainer turns cached answers into targets: a finished one closed, a cut one and one without a sentence
    # end open (no end of turn); self_targets (train.json) counts them.
    from shield_ds.train import BENIGN_TARGETS_FILE, ShieldTrainer, TrainConfig

    benign = write_jsonl(tmp_path / "open.jsonl", [{"id": f"o{i}", "prompt": f"Question {i}?", "language": "en",
                                                    "label": "benign"} for i in range(3)])
    cfg = TrainConfig(model=str(setup["model"]), neurons=str(setup["neurons"]), benign=[str(benign)], languages=["en"],
                      per_group_limit=3, split="all", benign_targets="self", max_new_tokens=5, out=str(tmp_path / "t"))
    trainer = ShieldTrainer(cfg)
    trainer.prepare()
    answers = [("Fine.", True), ("It is blue. Becau", False), ("no end here", False)]
    ids = sorted(r.id for r in trainer.needs_self_targets)
    assert len(ids) == 3
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / BENIGN_TARGETS_FILE).write_text("".join(
        json.dumps({"id": key, "response": text, "finished": done, "max_new_tokens": 5,
                    "model_hash": trainer.config_hash}) + "\n" for key, (text, done) in zip(ids, answers)))
    trainer._fill_self_targets(None)  # every answer is cached: nothing is generated
    assert trainer.self_targets == {"generated": 3, "cut": 1, "open_without_sentence_end": 1, "max_new_tokens": 5}
    targets = {r.id: (r.response, r.response_open) for r in trainer.records if r.label == "benign"}
    assert [targets[key] for key in ids] == [("Fine.", False), ("It is blue.", True), ("no end here", True)]
    cut = next(r for r in trainer.records if r.id == ids[1])
    batch = collator([cut])
    assert tokenizer.decode(batch.labels[batch.labels != -100].tolist()).strip() == "It is blue."
    # generate_responses tells finished answers (an end-of-sequence token) from ones cut by the limit.
    from shield_ds.evaluate.generate import generate_responses

    model = loaded.model.eval()
    record = SafetyRecord(id="q", prompt="Name a colour.", language="en", label="benign")
    first = generate_responses(model, loaded.processor, loaded.adapter, [record], max_new_tokens=3, return_finished=True)
    assert first["q"][1] is False
    ids = collator.__class__(loaded.processor, loaded.adapter)([record]).inputs
    token = int(model.generate(**ids, max_new_tokens=1, do_sample=False)[0, -1])
    model.generation_config.eos_token_id = token  # now the first generated token ends the answer
    assert generate_responses(model, loaded.processor, loaded.adapter, [record], max_new_tokens=3,
                              return_finished=True)["q"][1] is True


def test_benign_pivot_answers_other_languages_with_the_pivot_answer(setup, tmp_path):
    """--benign-pivot en: a vi benign prompt is trained on the base model's answer to its en version (same prompt
    key); the cache holds answers by the id of the prompt answered; a prompt with no en version keeps its own."""
    from shield_ds.errors import ShieldError
    from shield_ds.train import BENIGN_TARGETS_FILE, ShieldTrainer, TrainConfig

    rows = [{"id": f"q{i}.{lang}", "prompt": f"Question {i} ({lang})?", "language": lang, "label": "benign"}
            for i in range(3) for lang in ("en", "vi", "zh")]
    rows.append({"id": "only.vi", "prompt": "Only in Vietnamese?", "language": "vi", "label": "benign"})
    benign = write_jsonl(tmp_path / "parallel.jsonl", rows)
    common = dict(model=str(setup["model"]), neurons=str(setup["neurons"]), benign=[str(benign)], split="all",
                  benign_targets="self", max_new_tokens=5, out=str(tmp_path / "t"))
    trainer = ShieldTrainer(TrainConfig(languages=["vi", "zh"], benign_pivot="EN", **common))
    trainer.prepare()
    assert trainer.cfg.benign_pivot == "en"
    assert {k: v.id for k, v in trainer.pivots.items()} == {f"q{i}.{lang}": f"q{i}.en" for i in range(3)
                                                            for lang in ("vi", "zh")}
    (tmp_path / "t").mkdir()
    cached = {f"q{i}.en": f"Answer {i}." for i in range(3)} | {"only.vi": "Own answer."}
    (tmp_path / "t" / BENIGN_TARGETS_FILE).write_text("".join(
        json.dumps({"id": key, "response": text, "finished": True, "max_new_tokens": 5,
                    "model_hash": trainer.config_hash}) + "\n" for key, text in cached.items()))
    trainer._fill_self_targets(None)  # every answer is cached: nothing is generated
    targets = {r.id: r.response for r in trainer.records if r.label == "benign"}
    assert targets == {**{f"q{i}.{lang}": f"Answer {i}." for i in range(3) for lang in ("vi", "zh")},
                       "only.vi": "Own answer."}
    assert trainer.self_targets == {"generated": 4, "cut": 0, "open_without_sentence_end": 0, "max_new_tokens": 5,
                                    "pivot": "en", "pivoted": 6, "records": 7}
    # A checkpoint written before the flag existed resumes (its missing entry reads as no pivot).
    from shield_ds.train import fingerprint_differences

    now = {"benign_pivot": None, "lr": 1e-3}
    assert fingerprint_differences({"lr": 1e-3}, now) == []
    assert fingerprint_differences({"lr": 1e-3}, {**now, "benign_pivot": "en"}) == ['benign_pivot (null -> "en")']
    # Flag errors: one line naming the flag; a pivot language missing from the data names it and the source.
    with pytest.raises(ShieldError, match="--benign-pivot needs --benign-targets self"):
        TrainConfig(benign_pivot="en", **{**common, "benign_targets": "none"})
    with pytest.raises(ShieldError, match="--benign-pivot: unknown language code 'xx'"):
        TrainConfig(benign_pivot="xx", **common)
    with pytest.raises(ShieldError, match="--benign-pivot it: requested languages not in the data: it"):
        ShieldTrainer(TrainConfig(languages=["vi"], benign_pivot="it", **common)).prepare()


def test_lora_delta_matches_peft_merge():
    from peft import LoraConfig, inject_adapter_in_model
    from shield_ds.train import lora_delta

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5))
    base = model[0].weight.detach().clone()
    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=3, target_modules=["0"]), model)
    torch.nn.init.normal_(model[0].lora_B["default"].weight)
    delta = lora_delta(model[0])
    model[0].merge()
    torch.testing.assert_close(model[0].base_layer.weight.detach(), base + delta)


def test_identify_and_train_default_to_the_same_data():
    from shield_ds.cli import read_config
    from shield_ds.train import TrainConfig

    effective = {}
    for name, cls in (("identify", IdentifyConfig), ("train", TrainConfig)):
        cfg, _ = read_config(cls, [], embedded_default=name)
        effective[name] = {key: getattr(cfg, key) for key in ("languages", "modalities", "harmful", "benign")}
        assert cfg.modalities == ["text"], name
    assert effective["identify"] == effective["train"]
