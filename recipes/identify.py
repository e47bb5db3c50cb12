"""Stage 1 of Precise Shield: identify safety neurons.

    deepspeed --num_gpus 2 recipes/identify.py            # embedded default (tiny llava, shared data)
    python recipes/identify.py --model DIR --out runs/x   # one process, no launcher
    deepspeed recipes/identify.py --config configs/identify.yaml --ratio 0.02
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shield_ds.config import csv_list, parse_args  # noqa: E402
from shield_ds.errors import exit_on_error  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Find safety neurons from harmful vs benign activation statistics.")
    p.add_argument("--model", default=None, help="checkpoint directory or hub name (default: the tiny llava demo model)")
    p.add_argument("--harmful", action="append", default=None, help="harmful data: file, hub name or builtin (repeatable; default multijail)")
    p.add_argument("--benign", action="append", default=None, help="benign data (repeatable; default multiq)")
    p.add_argument("--languages", default=None, help="comma-separated ISO 639-1 codes (default: all in the data)")
    p.add_argument("--modalities", default="text,typographic", help="comma-separated: text, image, typographic")
    p.add_argument("--image", default=None, help="image file for the 'image' modality view")
    p.add_argument("--score", default="saliency", choices=["saliency", "contrast", "frequency"])
    p.add_argument("--ratio", type=float, default=0.01, help="per-layer top fraction of neurons")
    p.add_argument("--max-param-fraction", type=float, default=0.0003, help="cap on selected parameters / all parameters (0 disables)")
    p.add_argument("--tokens", default="all", choices=["all", "last"], help="prompt tokens the statistics reduce over")
    p.add_argument("--include-image-tokens", action="store_true", help="also count image-placeholder tokens")
    p.add_argument("--per-group-limit", type=int, default=None, help="at most N records per label x language x modality")
    p.add_argument("--batch-size", type=int, default=8, help="records per forward pass per rank")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/identify")
    p.add_argument("--ds-config", default="ds_configs/zero3_infer.json", help="DeepSpeed JSON, or 'none' for plain PyTorch")
    p.add_argument("--ds", action="append", default=[], metavar="KEY=VALUE", help="override a ds_config entry")
    p.add_argument("--offload-params", action="store_true", help="ZeRO-3 parameter offload to CPU")
    p.add_argument("--data-dir", default=None, help="where the builtin datasets live (default: ../shared/data)")
    p.add_argument("--overwrite", action="store_true", help="replace an output directory from another model/configuration")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    return p


@exit_on_error
def main(argv: list[str] | None = None) -> None:
    args = parse_args(build_parser(), argv)
    from shield_ds.engine import init_distributed
    from shield_ds.defaults import default_model
    from shield_ds.neurons.identify import IdentifyConfig, Identifier

    init_distributed()
    cfg = IdentifyConfig(
        model=args.model or str(default_model()),
        harmful=args.harmful or ["multijail"], benign=args.benign or ["multiq"],
        languages=csv_list(args.languages), modalities=csv_list(args.modalities) or ["text"], image=args.image,
        score=args.score, ratio=args.ratio, max_param_fraction=args.max_param_fraction, tokens=args.tokens,
        include_image_tokens=args.include_image_tokens, per_group_limit=args.per_group_limit,
        batch_size=args.batch_size, seed=args.seed, out=args.out,
        ds_config=None if str(args.ds_config).lower() == "none" else args.ds_config, ds_overrides=args.ds,
        offload_params=args.offload_params, data_dir=args.data_dir, overwrite=args.overwrite,
    )
    Identifier(cfg).run()


if __name__ == "__main__":
    main()
