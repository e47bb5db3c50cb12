"""Smoke test of the benchmarks (issue #7) at toy size: the commands run and print every ratio.

No timing assertions (this machine is shared); only structural facts are checked, e.g. that delta
mode's optimizer state is a small fraction of mask mode's.
"""

from __future__ import annotations

import importlib.util
import json

import pytest

from conftest import REPO, run_python, timeout_above

pytestmark = pytest.mark.distributed

RATIO_LABELS = [
    "identify forward: hooks / plain", "train step time: mask / ffn", "train peak memory: mask / ffn",
    "train step time: delta / full", "train peak memory: delta / full", "train step time: lora / full",
    "train peak memory: lora / full", "train step time: delta / lora", "train peak memory: delta / lora",
    "optimizer state: delta / mask", "optimizer state: lora / mask",
    "identify forward: last-position logits / every position's",
    "train step time: mask / mask with every position's logits",
    "train peak memory: mask / mask with every position's logits",
]
# run.py's smoke test trains these modes only (each is a launch); gpu_7b.py's (tests/test_gpu_check.py), all six.
RUN_PY_MODES = ("mask", "delta", "lora")
RUN_PY_LABELS = [label for label in RATIO_LABELS
                 if "ffn" not in label and "/ full" not in label and "mask with every" not in label]
EVAL_LABELS = [
    "evaluate tokens/s: replica (--zero off) / ZeRO-3 (--zero on)",
    "evaluate tokens/s: replica (--zero off) / plain transformers, 1 process",
    "evaluate tokens/s: ZeRO-3 (--zero on) / plain transformers, 1 process",
]


def check_results(out: str, results: dict, labels: list[str] = RATIO_LABELS) -> None:
    """Every ratio row printed and recorded, and the structural facts of the modes that ran."""
    for label in labels:
        assert f"| {label} |" in out, f"row {label!r} missing from the printed table"
    rows = {r["label"]: r for r in results["ratios"]}
    assert set(rows) == set(labels)
    for row in rows.values():
        assert row["value"] > 0 and row["baseline"] > 0
    train = results["train"]
    # Structural: delta trains k rows/cols per layer, mask whole FFN matrices (k / width = 1/256 here).
    assert train["delta"]["optimizer_state_bytes"] < 0.01 * train["mask"]["optimizer_state_bytes"]
    assert train["lora"]["optimizer_state_bytes"] < train["mask"]["optimizer_state_bytes"]
    assert train["delta"]["trainable_params"] == train["delta"]["neurons"] * 3 * 64  # k * (2 rows + 1 col) * hidden
    if "ffn" in train:
        assert train["mask"]["trainable_params"] == train["ffn"]["trainable_params"]
    if "full" in train:
        assert train["full"]["trainable_params"] == train["full"]["total_params"]


@timeout_above(1200)
def test_cpu_benchmark_tiny(tmp_path):
    out_json = tmp_path / "results.json"
    proc = run_python([str(REPO / "benchmarks" / "run.py"), "--size", "tiny", "--steps", "2", "--warmup", "1",
                       "--modes", ",".join(RUN_PY_MODES), "--work-dir", str(tmp_path / "work"), "--json", str(out_json),
                       "--timeout", "400", "--records", "12"],
                      timeout=1200)
    report = json.loads(out_json.read_text())
    assert report["machine"]["nproc"] >= 1 and report["sizes"]["tiny"]["ranks"] == 2
    assert report["sizes"]["tiny"]["settings"]["records"] == 12  # --records overrides the size's 16
    results = report["sizes"]["tiny"]
    assert results["identify"]["world_size"] == 2
    assert all(len(results["identify"][v]["step_times_s"]) == 2 for v in ("plain", "hooks", "full_logits"))
    assert set(results["train"]) == set(RUN_PY_MODES)
    check_results(proc.stdout, results, RUN_PY_LABELS + EVAL_LABELS)
    evaluate = results["evaluate"]
    engines = evaluate["engines"]
    # The three evaluation engines give the same answers; the replica and ZeRO-3 ran on 2 ranks.
    assert evaluate["identical"] and "answers identical in all three engines: yes" in proc.stdout
    assert engines["zero-on"]["zero"] == "on" and engines["zero-off"]["zero"] == "off"
    assert engines["zero-on"]["ranks"] == engines["zero-off"]["ranks"] == 2 and engines["plain"]["ranks"] == 1
    assert engines["plain"]["tokens"] == engines["zero-on"]["tokens"] == engines["zero-off"]["tokens"] > 0
    # ZeRO-3 holds a partition of the weights per rank (here nearly all persistent), the replica all of them
    assert 0 < engines["zero-on"]["weight_bytes_per_rank"] <= engines["zero-off"]["weight_bytes_per_rank"]


def _bench_module(name: str):
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    return importlib.import_module(name)


def test_scaling_table_rows_and_planner_prediction(tiny_checkpoint):
    """The scaling part's row and table from a worker result (no launch: `run.py --parts scaling` takes minutes
    here); the planner's model state shrinks with the ranks (ZeRO-3 partitions it), for LoRA too."""
    sb = _bench_module("shield_bench")
    from shield_ds.engine import resolve_ds_config

    model = tiny_checkpoint("llava")
    ds_config = resolve_ds_config("zero3_fp32.json", micro_batch_size=2, world_size=1)
    worker = {"total_params": 309_952, "trainable_params": 1000, "median_s": 0.1, "tokens_per_s": 500.0,
              "peak_bytes": 600 * 2**20, "baseline_bytes": 500 * 2**20, "memory_kind": "peak RSS (VmHWM)",
              "ds_config": ds_config, "neuron_param_fraction": 0.0025}
    identify = {**worker, "hooks": {"median_s": 0.02, "tokens_per_s": 900.0}}
    rows = [sb.scaling_row("tiny", ranks, mode, identify if mode == "identify" else worker, model)
            for ranks in (1, 2) for mode in ("identify", "mask", "delta", "lora")]
    planned = {(r["ranks"], r["mode"]): r["planned_model_state_bytes"] for r in rows}
    for mode in ("identify", "mask", "delta", "lora"):
        assert 0 < planned[(2, mode)] < planned[(1, mode)], mode
    # weights only for identify; mask adds 16 bytes (fp32 grad + master + 2 moments) per FFN parameter
    assert planned[(1, "identify")] == pytest.approx(4 * 309_952, rel=0.01)
    assert planned[(1, "mask")] > planned[(1, "lora")] > planned[(1, "delta")] > planned[(1, "identify")]
    assert rows[0]["median_s"] == 0.02  # identify's row times the hooked forward
    table = sb.format_scaling_table(rows)
    assert table.count("\n") == len(rows) + 1
    assert "| tiny | 309,952 | 2 | mask | 1,000 | 100.0 ms | 500 | 600.0 MiB | 100.0 MiB |" in table
    assert "n/a" not in table


def test_run_py_refuses_a_model_that_is_no_checkpoint(tmp_path):
    proc = run_python([str(REPO / "benchmarks" / "run.py"), "--model", str(tmp_path / "nothing"), "--parts", "train",
                       "--work-dir", str(tmp_path / "work")], timeout=120, check=False)
    assert proc.returncode == 2 and f"--model {tmp_path / 'nothing'}: not a checkpoint directory" in proc.stderr
    assert not (tmp_path / "work").exists()
