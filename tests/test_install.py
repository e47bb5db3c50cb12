"""A non-editable install: the package carries its DeepSpeed configs, the recipes' embedded defaults and the
shipped data, and the recipes run from another working directory without the checkout on the path."""

from __future__ import annotations

import json
import shutil

from conftest import PYTHON, REPO, child_env, run_cmd


def test_non_editable_install_runs_a_recipe_from_another_directory(tmp_path, shared_data):
    site = tmp_path / "site"
    run_cmd([PYTHON, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps", "--no-build-isolation",
             "--target", str(site), str(REPO)], timeout=600, cwd=tmp_path)
    package = site / "shield_ds"
    for shipped in ("ds_configs/zero3_infer.json", "ds_configs/zero3_bf16.json", "recipe_defaults/identify.yaml",
                    "data/builtin/requests.csv", "evaluate/refusal_phrases.yaml"):
        assert (package / shipped).is_file(), shipped
    work = tmp_path / "elsewhere"
    work.mkdir()
    shutil.copy(REPO / "recipes" / "identify.py", work / "identify.py")  # its sys.path entry is `work`'s parent
    env = child_env(SHIELD_DS_DATA=str(shared_data))
    env["PYTHONPATH"] = str(site)
    where = run_cmd([PYTHON, "-c", "import shield_ds; print(shield_ds.__file__)"], cwd=work, env=env, timeout=120)
    assert where.stdout.strip().startswith(str(package)), where.stdout
    # no --model and no --config: the embedded default (package data), its tiny model built under the
    # working directory, and the default --ds-config ds_configs/zero3_infer.json found in the package
    run_cmd([PYTHON, "identify.py", "--out", "out", "--languages", "en", "--per-group-limit", "4"], cwd=work,
            env=env, timeout=600)
    meta = json.loads((work / "out" / "neurons.json").read_text())
    assert meta["model"].startswith(str(work / "runs" / "models")) and meta["config"]["benign"] == ["multiq", "requests"]
    assert not (REPO / "out").exists()
