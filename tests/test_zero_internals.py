"""The DeepSpeed internals shield-ds relies on (`shield_ds/zero_internals.py`) are where it expects them.

A real one-rank ZeRO-3 engine (gloo, CPU) is built through `ShieldEngine.load` (full-ffn mode) and every
parameter and stage-3 optimizer field that `zero_internals` reads or replaces is checked, by type and
shape. A DeepSpeed upgrade that moved one fails here, with the version and the field named, before
the masking tests fail in some harder-to-read way.
"""

from __future__ import annotations

import json

import pytest

from conftest import REPO, run_python

pytestmark = pytest.mark.distributed


def test_deepspeed_internals_are_where_zero_internals_reads_them(tiny_checkpoint, tmp_path):
    out = tmp_path / "problems.json"
    run_python([str(REPO / "tests" / "workers" / "zero_internals_worker.py"), "--model", str(tiny_checkpoint("llava")),
                "--out", str(out)], timeout=300)
    problems = json.loads(out.read_text(encoding="utf-8"))
    assert not problems, "DeepSpeed moved internals shield_ds/zero_internals.py relies on:\n" + "\n".join(problems)


def test_deepspeed_is_in_the_tested_range():
    """pyproject pins the range the internals were written against; an installed version outside it is named."""
    import deepspeed
    from packaging.version import Version

    assert Version("0.19") <= Version(deepspeed.__version__) < Version("0.20"), (
        f"deepspeed {deepspeed.__version__} is outside the tested range >=0.19,<0.20 (shield_ds/zero_internals.py)")
