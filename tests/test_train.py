"""Stage 2: masked training on 2 CPU ranks under ZeRO-3; export, patch, resume, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, child_env, run_deepspeed, run_python
from identify_helpers import write_jsonl
from shield_ds.neurons import NeuronSet
from shield_ds.neurons.identify import IdentifyConfig, Identifier

TRAIN = str(REPO / "recipes" / "train.py")
EVALUATE = str(REPO / "recipes" / "evaluate.py")
pytestmark = pytest.mark.distributed


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
    run_deepspeed(TRAIN, _args(setup, out), num_ranks=2, timeout=600)
    return out


def test_only_selected_slices_change(setup, mask_run):
    ns = NeuronSet.load(setup["neurons"])
    base, trained = _weights(setup["model"]), _weights(mask_run / "model")
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
    total = sum(t.numel() for t in base.values())
    assert 0 < changed / total <= ns.param_fraction
    summary = json.loads((mask_run / "train.json").read_text())
    assert summary["steps"] == 4 and summary["world_size"] == 2


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
        assert proc.returncode == 2 and "another base model" in proc.stderr.strip().splitlines()[-1]
        assert not (tmp_path / "bad").exists()


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
    _one_line_error(proc, f"trained on {len(trained_harmful)} of the evaluated prompts")
    assert not (tmp_path / "train").exists()
    run_python([*ev, *compare, "--allow-overlap"], timeout=300)
    asr = json.loads((tmp_path / "train" / "asr.json").read_text())
    assert (asr["split"], asr["trained_overlap"]) == ("train", len(trained_harmful))
    assert OVERLAP_NOTE in (tmp_path / "train" / "compare.md").read_text()


def test_delta_mode_equals_mask_mode(setup, mask_run):
    out = setup["tmp"] / "delta"
    run_deepspeed(TRAIN, _args(setup, out, "--update", "delta"), num_ranks=2, timeout=600)
    a, b = _weights(mask_run / "model"), _weights(out / "model")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-7, msg=key)


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


def _one_line_error(proc, needle: str) -> None:
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and needle in last, last


def test_bad_input_one_line_error_and_outputs_untouched(setup, mask_run, tiny_checkpoint, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(mask_run, out, ignore=shutil.ignore_patterns("checkpoints"))
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    base = ["--ds-config", "ds_configs/zero3_fp32.json", "--out", str(out), "--max-steps", "1"]
    # 1. a neuron set identified on another model
    proc = run_python([TRAIN, "--model", str(tiny_checkpoint("gemma3")), "--neurons", str(setup["neurons"]), *base],
                      check=False, timeout=300)
    _one_line_error(proc, "neuron set")
    # 2. an empty training set
    empty = write_jsonl(tmp_path / "empty.jsonl", [])
    proc = run_python([TRAIN, "--model", str(setup["model"]), "--neurons", str(setup["neurons"]),
                       "--harmful", str(empty), "--benign", str(empty), *base], check=False, timeout=300)
    _one_line_error(proc, "empty")
    # 3. benign records without responses and no --benign-targets
    proc = run_python([TRAIN, "--model", str(setup["model"]), "--neurons", str(setup["neurons"]),
                       "--languages", "en", "--per-group-limit", "2", *base], check=False, timeout=300)
    _one_line_error(proc, "--benign-targets self")
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
