"""Plain `transformers` generation speed under two transformers versions, in one command (issue #29).

    python benchmarks/generate_bench.py                                   # installed vs 5.24.0, tiny models
    python benchmarks/generate_bench.py --models tiny-llava,runs/models/smollm2-135m-instruct --rounds 3

A minimal reproduction, with no shield_ds code in the timed process: each measurement is a fresh
`python` that loads the checkpoint with `AutoModelFor...from_pretrained`, generates once to warm up,
then times `--passes` greedy `generate` calls of `--batch` prompts x exactly `--new-tokens` tokens
(min = max new tokens, so every version produces the same number). The other version is installed
with `pip install --no-deps --target WORK_DIR/transformers-VERSION` (from the package index, once) and
put first on PYTHONPATH; everything else (torch, tokenizers, huggingface_hub, kernels) is the
environment's. Variants alternate within each round (ABAB...), so drift in machine load hits all of
them. `kernels off` runs the installed version with USE_HUB_KERNELS=0 and the `kernels` package
hidden, the suspect of the slowdown the project measured once. Generated token ids are hashed: the
table says whether every variant produced the same tokens.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
sys.path.insert(0, str(REPO))

from shield_ds.errors import ShieldError  # noqa: E402
from shield_ds.process_group import ToolParser, exit_on_error  # noqa: E402
from shield_ds.io import write_json  # noqa: E402
from shield_ds.tables import markdown_table  # noqa: E402
from shield_ds.models.tiny import build_tiny  # noqa: E402

TINY = {"tiny-llava": "llava", "tiny-llama": "llama"}
HIDE_KERNELS = "import sys; sys.modules['kernels'] = None"  # `import kernels` then fails: transformers sees none


def child(args: argparse.Namespace) -> None:
    """One measurement: load, warm up, time `passes` generate calls; print one JSON line."""
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(args.model)
    auto = AutoModelForImageTextToText if hasattr(config, "vision_config") else AutoModelForCausalLM
    model = auto.from_pretrained(args.model, dtype=torch.float32).eval()
    vocab = getattr(getattr(config, "text_config", config), "vocab_size")
    ids = torch.randint(10, min(vocab, 1000), (args.batch, args.prompt_tokens), generator=torch.Generator().manual_seed(1))
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=args.new_tokens,
                  min_new_tokens=args.new_tokens, pad_token_id=0)
    times, digest = [], hashlib.sha256()
    with torch.no_grad():
        model.generate(**{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4})
        for _ in range(args.passes):
            start = time.perf_counter()
            out = model.generate(**kwargs)
            times.append(time.perf_counter() - start)
            digest.update(out[:, ids.shape[1]:].numpy().tobytes())
    print("RESULT " + json.dumps({
        "transformers": transformers.__version__, "attn_implementation": model.config._attn_implementation,
        "threads": torch.get_num_threads(), "pass_seconds": times, "tokens_per_pass": args.batch * args.new_tokens,
        "tokens_sha256": digest.hexdigest()[:16], "kernels_module": "kernels" in sys.modules and
        sys.modules["kernels"] is not None}), flush=True)


def install_version(version: str, work_dir: Path) -> Path:
    """transformers==VERSION without dependencies under WORK_DIR (once); the directory for PYTHONPATH."""
    target = work_dir / f"transformers-{version}"
    if (target / "transformers" / "__init__.py").is_file():
        return target
    work_dir.mkdir(parents=True, exist_ok=True)
    print(f"installing transformers=={version} into {target}", file=sys.stderr, flush=True)
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
                           "--target", str(target), f"transformers=={version}"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise ShieldError(f"--versions {version}: pip could not install transformers=={version} "
                          f"({(proc.stderr.strip().splitlines() or ['no output'])[-1]})")
    return target


def resolve_model(name: str, work_dir: Path) -> Path:
    """A tiny generated checkpoint (built once with the installed transformers) or a checkpoint directory."""
    if name in TINY:
        out = work_dir / f"generate-{name}"
        if not (out / "config.json").is_file():
            build_tiny(TINY[name], out)
        return out
    path = Path(name)
    if not (path / "config.json").is_file():
        raise ShieldError(f"--models {name}: not a tiny model name ({', '.join(TINY)}) or a checkpoint directory "
                          "(for SmolLM2: bash scripts/real_models.sh)")
    return path


def variants(versions: list[str], work_dir: Path, kernels_off: bool) -> dict[str, dict[str, str]]:
    """Variant name -> environment additions."""
    out: dict[str, dict[str, str]] = {}
    for version in versions:
        if version == "installed":
            out["installed"] = {}
        else:
            out[version] = {"PYTHONPATH": str(install_version(version, work_dir))}
    if kernels_off:
        out["installed, kernels off"] = {"USE_HUB_KERNELS": "0", "SHIELD_DS_BENCH_PRELUDE": HIDE_KERNELS}
    return out


def measure(model: Path, extra_env: dict[str, str], args: argparse.Namespace) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update({"OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false", **extra_env})
    child_argv = [str(Path(__file__).resolve()), "--child", "--model", str(model), "--batch", str(args.batch),
                  "--new-tokens", str(args.new_tokens), "--prompt-tokens", str(args.prompt_tokens),
                  "--passes", str(args.passes)]
    prelude = env.pop("SHIELD_DS_BENCH_PRELUDE", "")
    code = f"{prelude}\nimport runpy, sys\nsys.argv = {child_argv!r}\nrunpy.run_path(sys.argv[0], run_name='__main__')"
    cmd = [sys.executable, "-c", code]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.exit(f"generate benchmark child failed ({proc.returncode}) for {model} {extra_env}:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def table(results: dict[str, dict[str, list[dict]]], baseline: str) -> str:
    """Per model and variant: tokens/s of the median and the best pass, the ratio to `baseline`, same tokens."""
    body = []
    for model, per_variant in results.items():
        base_hash = per_variant[baseline][0]["tokens_sha256"] if baseline in per_variant else None
        rate = {}
        for name, runs in per_variant.items():
            passes = [t for run in runs for t in run["pass_seconds"]]
            rate[name] = (runs[0]["tokens_per_pass"] / statistics.median(passes), runs[0]["tokens_per_pass"] / min(passes))
        for name, runs in per_variant.items():
            ratio = rate[name][0] / rate[baseline][0] if baseline in rate else float("nan")
            same = all(run["tokens_sha256"] == base_hash for run in runs)
            body.append([Path(model).name, name, runs[0]["transformers"], f"{rate[name][0]:.0f}", f"{rate[name][1]:.0f}",
                         f"{ratio:.2f}", "yes" if same else "**no**"])
    return markdown_table(["model", "variant", "transformers", "tokens/s (median pass)", "tokens/s (best pass)",
                           f"ratio to {baseline}", "same tokens"], body)


@exit_on_error
def main(argv: list[str] | None = None) -> None:
    p = ToolParser(prog="python benchmarks/generate_bench.py", description=__doc__.splitlines()[0])
    p.add_argument("--versions", default="installed,5.24.0", help="transformers versions: 'installed' and/or X.Y.Z")
    p.add_argument("--models", default="tiny-llava,tiny-llama", help=f"comma-separated: {', '.join(TINY)} or checkpoint dirs")
    p.add_argument("--no-kernels-variant", action="store_true", help="skip the installed version with kernels off")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--passes", type=int, default=3, help="timed generate calls per process")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=20)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each measuring process")
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--work-dir", default="/tmp/shield-ds-bench")
    p.add_argument("--json", default=None, help="also write the measurements here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return
    work = Path(args.work_dir)
    versions = [v.strip() for v in args.versions.split(",") if v.strip()]
    models = [resolve_model(m.strip(), work) for m in args.models.split(",") if m.strip()]
    envs = variants(versions, work, not args.no_kernels_variant)
    results: dict[str, dict[str, list[dict]]] = {str(m): {name: [] for name in envs} for m in models}
    load_before = os.getloadavg()
    for round_index in range(args.rounds):
        order = list(envs) if round_index % 2 == 0 else list(reversed(envs))
        for model in models:
            for name in order:
                result = measure(model, envs[name], args)
                results[str(model)][name].append(result)
                print(f"  round {round_index + 1} {model.name} {name}: "
                      f"{result['tokens_per_pass'] / statistics.median(result['pass_seconds']):.0f} tok/s",
                      file=sys.stderr, flush=True)
    baseline = versions[0]
    print(f"\nplain transformers generate, batch {args.batch} x {args.new_tokens} new tokens, {args.threads} thread(s), "
          f"{args.rounds} rounds x {args.passes} passes; load average {load_before[0]:.1f} -> {os.getloadavg()[0]:.1f}\n")
    print(table(results, baseline))
    if args.json:
        write_json(args.json, {"settings": {k: v for k, v in vars(args).items() if k not in ("child", "model")},
                               "load_average": [load_before, os.getloadavg()], "results": results})


if __name__ == "__main__":
    main()
