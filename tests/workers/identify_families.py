"""Worker: identify safety neurons for several checkpoints in one ZeRO-3 process group.

    deepspeed --num_gpus 2 tests/workers/identify_families.py OUT_ROOT MODEL_DIR [MODEL_DIR ...]

Each model gets OUT_ROOT/<dir name>/ (a normal identify output); one launch amortises start-up. Vision-language
models run text and typographic with the vision scope, decoder-only models text alone.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from shield_ds.process_group import init_distributed  # noqa: E402
from shield_ds.models import get_adapter, load_config  # noqa: E402
from shield_ds.neurons.identify import IdentifyConfig, Identifier  # noqa: E402


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    out_root, models = Path(args[0]), args[1:]
    init_distributed()
    for model in models:
        images = get_adapter(load_config(model)).supports_images  # text-only LLMs: text, no vision scope
        modalities = ["text", "typographic"] if images else ["text"]
        cfg = IdentifyConfig(model=model, languages=["en", "ar"], modalities=modalities,
                             per_group_limit=2, batch_size=2, ratio=0.05, max_param_fraction=0.0,
                             scope="lm+vision" if images else "lm",
                             out=str(out_root / Path(model).name), zero="on",
                             ds_overrides=["bf16.enabled=false", "zero_optimization.stage3_param_persistence_threshold=0"])
        Identifier(cfg).run()


if __name__ == "__main__":
    main()
