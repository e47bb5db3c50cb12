"""Memory planner: preset sizes, a hand-computed tiny case, mode comparisons and the CLI contract."""

from __future__ import annotations

import json

import pytest
from conftest import assert_one_line_error, child_env, run_python

from shield_ds.errors import ShieldError
from shield_ds.plan import (GIB, PlanSettings, ZeroSettings, count_model, format_plan, inventory, main,
                            plan_memory, plan_table_markdown, resolve_config)
from shield_ds.plan_presets import PRESETS, PUBLISHED_PARAMS

# hidden 64, FFN 128, 2 layers, 4 heads of 16 with 2 KV heads, vocab 256, untied lm_head.
TINY = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, vocab_size=256, tie_word_embeddings=False,
            max_position_embeddings=128)
TINY_ZERO = ZeroSettings(reduce_bucket_size=2000, prefetch_bucket_size=1000, param_persistence_threshold=100,
                         sub_group_size=10_000)


@pytest.fixture(scope="module")
def tiny_config_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("plan") / "config.json"
    path.write_text(json.dumps(TINY))
    return path


@pytest.fixture(scope="module")
def tiny(tiny_config_path):
    return count_model(resolve_config(str(tiny_config_path)), name="tiny")


def test_tiny_counts_by_hand(tiny):
    embed = lm_head = 256 * 64
    attention = 64 * 64 + 64 * 32 + 64 * 32 + 64 * 64  # q, k, v (2 KV heads x 16), o
    ffn = 3 * 64 * 128
    layer = attention + ffn + 2 * 64  # two RMSNorms
    assert tiny.total_params == embed + 2 * layer + 64 + lm_head == 106_816
    assert tiny.ffn_params == 2 * ffn == 49_152
    assert tiny.ffn_layers == 2
    assert tiny.largest_module_params == 256 * 64
    assert tiny.largest_ffn_matrix == 64 * 128
    assert tiny.kv_dim == 32 and tiny.vocab == 256
    assert tiny.persistent_params(100) == 5 * 64  # 4 layer norms + the final norm


def test_tiny_mask_plan_exact_bytes(tiny):
    plan = plan_memory(tiny, PlanSettings(nodes=1, gpus_per_node=2, update="mask", micro_batch=2, seq_len=8,
                                          zero=TINY_ZERO))
    world, tokens, trainable, persistent = 2, 16, 49_152, 320
    assert plan.trainable_params == trainable
    assert plan.gpu == {
        "weights": 2 * (106_816 - persistent) / world + 2 * persistent,
        "gradients": 2 * trainable / world,
        "optimizer": 12 * trainable / world,
        "fp32 step gradient buffer": 4 * 10_000,  # min(sub_group_size, 24_576 local)
        "zero-3 gathered params": 2 * 16_384 + 2 * 1000,  # embedding beats 2 x (weight + grad) of an FFN matrix
        "zero-3 reduce bucket": 2 * 2000,
        "activations": (2 * tokens * 64 * 2  # one checkpoint per layer
                        + 2 * tokens * (6 * 64 + 2 * 32 + 4 * 128) * 2  # one recomputed layer
                        + tokens * 256 * 14),  # logits for the loss
        "runtime reserve": 2 * GIB,
    }
    assert plan.gpu_total == 652_848 + 2 * GIB
    assert plan.host == {"process (per rank)": 2 * 4 * GIB}
    assert plan.fits


def test_tiny_offload_moves_optimizer_to_host(tiny):
    settings = dict(nodes=1, gpus_per_node=2, update="mask", micro_batch=2, seq_len=8, zero=TINY_ZERO)
    plain = plan_memory(tiny, PlanSettings(**settings))
    off = plan_memory(tiny, PlanSettings(offload=True, **settings))
    local = 49_152 / 2
    assert off.host["optimizer (offloaded)"] == 2 * 12 * local  # two ranks per node
    assert off.host["gradients (offloaded)"] == 2 * 2 * local
    assert off.host["fp32 step gradients (offloaded)"] == 2 * (4 * local + 4 * 10_000)
    assert "optimizer" not in off.gpu and "gradients" not in off.gpu
    assert plain.gpu_total - off.gpu_total == 2 * local + 12 * local + 4 * 10_000


def test_tiny_delta_rounds_to_whole_neurons(tiny):
    plan = plan_memory(tiny, PlanSettings(nodes=1, gpus_per_node=2, update="delta", neuron_fraction=0.01,
                                          zero=TINY_ZERO))
    assert plan.neurons == round(0.01 * 106_816 / 192) == 6
    assert plan.trainable_params == 6 * 3 * 64
    assert plan.gpu["optimizer"] == 12 * 6 * 192 / 2


def test_tiny_lora_counts_adapters_by_hand(tiny):
    plan = plan_memory(tiny, PlanSettings(nodes=1, gpus_per_node=2, update="lora", lora_rank=8, zero=TINY_ZERO))
    per_layer = (64 + 64) + 2 * (64 + 32) + (64 + 64) + 3 * (64 + 128)  # q, k, v, o, gate, up, down: in + out
    assert plan.trainable_params == 8 * 2 * per_layer == 16_384 and plan.neurons == 0
    assert plan.gpu["optimizer"] == 12 * 16_384 / 2
    ffn_only = plan_memory(tiny, PlanSettings(update="lora", lora_rank=2, lora_targets=("gate", "up", "down_proj")))
    assert ffn_only.trainable_params == 2 * 2 * 3 * (64 + 128)
    with pytest.raises(ShieldError, match="'w9'.*no decoder-layer w9_proj"):
        plan_memory(tiny, PlanSettings(update="lora", lora_targets=("w9",)))


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl", "gemma3_text"])
def test_lora_plan_matches_the_adapters_peft_attaches(tiny_checkpoint, arch):
    """The planner's LoRA count is what `--update lora` really trains (vision towers never adapted)."""
    from shield_ds.models import get_adapter
    from shield_ds.models.loader import load_model
    from shield_ds.trainable import LoraSettings, attach_lora

    loaded = load_model(tiny_checkpoint(arch))
    attach_lora(loaded.model, get_adapter(loaded.config), LoraSettings(rank=3))
    attached = sum(p.numel() for p in loaded.model.parameters() if p.requires_grad)
    plan = plan_memory(inventory(str(tiny_checkpoint(arch))), PlanSettings(update="lora", lora_rank=3))
    assert plan.trainable_params == attached > 0


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_totals_match_published(name):
    inv = inventory(name)
    assert abs(inv.total_params - PUBLISHED_PARAMS[name]) / PUBLISHED_PARAMS[name] < 0.02
    # the gated FFNs are most of a modern LLM's weights
    assert 0.5 < inv.ffn_params / inv.total_params < 0.85


def test_delta_optimizer_is_tiny_next_to_mask():
    for name in PRESETS:
        inv = inventory(name)
        mask = plan_memory(inv, PlanSettings(update="mask"))
        delta = plan_memory(inv, PlanSettings(update="delta"))
        assert delta.optimizer_bytes <= 0.001 * mask.optimizer_bytes
        assert delta.gpu["activations"] == mask.gpu["activations"]


def test_known_verdicts():
    assert plan_memory(inventory("llava-1.5-7b"), PlanSettings(nodes=1, gpus_per_node=8, update="delta")).fits
    big_mask_one_node = plan_memory(inventory("llama-3.2-90b-vision"),
                                    PlanSettings(nodes=1, gpus_per_node=8, update="mask"))
    # 16 bytes x 70.5B FFN params / 8 GPUs alone is ~131 GiB per GPU
    assert not big_mask_one_node.fits and big_mask_one_node.gpu_headroom_gib < -50
    assert plan_memory(inventory("llama-3.2-90b-vision"),
                       PlanSettings(nodes=8, gpus_per_node=8, update="mask")).fits
    assert plan_memory(inventory("llama-3.2-90b-vision"),
                       PlanSettings(nodes=1, gpus_per_node=8, update="delta")).fits


def test_report_ends_with_verdict(tiny_config_path, capsys):
    main(["--model", str(tiny_config_path), "--nodes", "1", "--gpus-per-node", "2", "--update", "delta"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("fits: headroom")
    main(["--model", str(tiny_config_path), "--gpus-per-node", "2", "--gpu-memory", "1"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("does not fit: short by") and "per GPU" in last


def test_format_plan_lists_deepspeed_reference(tiny):
    text = format_plan(plan_memory(tiny, PlanSettings(gpus_per_node=2)))
    assert "estimate_zero3_model_states_mem_needs" in text
    assert text.splitlines()[-1].startswith(("fits", "does not fit"))


def test_table_has_every_row():
    table = plan_table_markdown()
    rows = [line for line in table.splitlines() if line.startswith("| ") and "GiB/GPU" not in line]
    assert len(rows) == 3 * 2 * 2  # models x node counts x modes
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert cells[4] in ("fits", "does not fit") and cells[7] in ("fits", "does not fit")
    assert "| llama-3.2-90b-vision | 1x8 | mask |" in table


def test_unknown_model_is_a_shield_error(tmp_path):
    with pytest.raises(ShieldError, match="not found"):
        resolve_config(str(tmp_path / "missing" / "config.json"))


def test_cli_missing_config_one_line_exit_2(tmp_path):
    missing = tmp_path / "nope" / "config.json"
    proc = run_python(["-m", "shield_ds.plan", "--model", str(missing)], check=False, timeout=180)
    assert_one_line_error(proc, str(missing))


def test_cli_unreachable_hub_name_exit_2():
    proc = run_python(["-m", "shield_ds.plan", "--model", "no-such-org/no-such-vlm"], check=False, timeout=180,
                      env=child_env(HF_HUB_OFFLINE="1"))
    assert_one_line_error(proc, "no-such-org/no-such-vlm")


def test_cli_preset_end_to_end():
    proc = run_python(["-m", "shield_ds.plan", "--model", "llava-1.5-7b", "--nodes", "1", "--gpus-per-node", "8",
                       "--update", "delta", "--offload"], timeout=300)
    out = proc.stdout.strip().splitlines()
    assert out[-1].startswith("fits")
    assert any(line.strip().startswith("optimizer (offloaded)") for line in out)
