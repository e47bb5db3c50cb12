"""The prepared GPU check, run as CI can: `bash scripts/gpu_check.sh --dry-run` (CPU, gloo, tiny sizes)."""

from __future__ import annotations

import json
import sys

import pytest

from conftest import child_env, run_cmd
from test_benchmarks import check_results

pytestmark = pytest.mark.distributed

STAGES = {"environment", "selfcheck", "tiny models and data", "adam kernel", "llava identify", "llava train mask",
          "llava train delta", "llava evaluate", "llava kill + resume", "llama identify", "llama train mask",
          "llama train delta", "llama evaluate", "gpu_7b benchmark"}


def _table(stdout: str) -> dict[str, tuple[str, str]]:
    """{stage: (result, detail)} from the summary table the script prints last."""
    rows = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 4 and cells[0] != "stage":
            rows[cells[0]] = (cells[1], cells[3])
    return rows


def test_dry_run_passes_every_stage(tmp_path):
    # PYTHON: this interpreter (the script then leaves PATH and the extension cache as the tests have them).
    # --budget below the timeout: a slow stage fails its row and the table still prints.
    proc = run_cmd(["bash", "scripts/gpu_check.sh", "--dry-run", "--budget", "360", "--work", str(tmp_path / "work"),
                    "--report", str(tmp_path / "report")], timeout=420, check=False,
                   env=child_env(PYTHON=sys.executable))
    rows = _table(proc.stdout)
    failed = {stage: detail for stage, (result, detail) in rows.items() if result != "pass"}
    assert proc.returncode == 0 and not failed, f"exit {proc.returncode}, failed: {failed}\n{proc.stderr[-6000:]}"
    assert set(rows) == STAGES
    assert "bit-identical" in rows["llava kill + resume"][1]
    assert "backend gloo" in rows["selfcheck"][1]
    report = tmp_path / "report"
    assert (report / "summary.md").read_text().strip() == proc.stdout.strip()
    # gpu_7b.py --toy: every train mode in one process, delta and LoRA again at full depth, every ratio printed
    results = json.loads((report / "gpu_7b.json").read_text())
    assert results["toy"] is True and set(results["full_depth"]) == {"delta", "lora"}
    check_results((tmp_path / "work" / "logs" / "gpu_7b.log").read_text(), results)
