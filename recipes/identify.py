"""Stage 1 of Precise Shield: identify safety neurons.

    deepspeed --num_gpus 2 recipes/identify.py            # embedded default (tiny llava, shared data)
    python recipes/identify.py --model DIR --out runs/x   # one process, no launcher
    deepspeed recipes/identify.py --config configs/identify.yaml --ratio 0.02
    deepspeed --num_gpus 8 recipes/identify.py --model BIG --zero on   # force ZeRO-3 (default: auto)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shield_ds.config import add_data_args, add_engine_args, data_kwargs, ds_config_arg, parse_args  # noqa: E402
from shield_ds.errors import exit_on_error  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Find safety neurons from harmful vs benign activation statistics.")
    p.add_argument("--model", default=None, help="checkpoint directory or hub name (default: the tiny llava demo model)")
    add_data_args(p, modalities="text", split="train")
    p.add_argument("--score", default="saliency", choices=["saliency", "contrast", "frequency"])
    p.add_argument("--ratio", type=float, default=0.01, help="per-layer top fraction of neurons")
    p.add_argument("--max-param-fraction", type=float, default=0.0003, help="cap on selected parameters / all parameters (0 disables)")
    p.add_argument("--cap-ranking", default="layer-normalized", choices=["layer-normalized", "raw"],
                   help="how the parameter cap ranks candidates across layers: by within-layer rank (keeps the "
                        "per-layer spread) or by raw score (favours deep layers)")
    p.add_argument("--tokens", default="all", choices=["all", "last"], help="prompt tokens the statistics reduce over")
    p.add_argument("--scope", default="lm", choices=["lm", "lm+vision"],
                   help="lm+vision: also find neurons in the vision tower's MLPs (written to OUT/vision/)")
    p.add_argument("--include-image-tokens", action="store_true", help="also count image-placeholder tokens")
    p.add_argument("--batch-size", type=int, default=8, help="records per forward pass per rank")
    p.add_argument("--out", default="runs/identify")
    add_engine_args(p, ds_config="ds_configs/zero3_infer.json", allow_none=True, inference=True)
    p.add_argument("--offload-params", action="store_true", help="ZeRO-3 parameter offload to CPU")
    p.add_argument("--overwrite", action="store_true", help="replace an output directory from another model/configuration")
    return p


@exit_on_error
def main(argv: list[str] | None = None) -> None:
    args = parse_args(build_parser(), argv, embedded_default="identify")
    from shield_ds.engine import init_distributed
    from shield_ds.defaults import default_model
    from shield_ds.neurons.identify import IdentifyConfig, Identifier

    init_distributed()
    cfg = IdentifyConfig(
        model=args.model or str(default_model()), **data_kwargs(args),
        score=args.score, ratio=args.ratio, max_param_fraction=args.max_param_fraction,
        cap_ranking=args.cap_ranking, tokens=args.tokens,
        include_image_tokens=args.include_image_tokens, batch_size=args.batch_size, out=args.out,
        ds_config=ds_config_arg(args.ds_config), ds_overrides=args.ds, zero=args.zero, offload_params=args.offload_params,
        overwrite=args.overwrite, scope=args.scope,
    )
    Identifier(cfg).run()


if __name__ == "__main__":
    main()
