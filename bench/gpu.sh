#!/usr/bin/env bash
# The GPU figures of docs/losses.md in one run, written to OUT (default bench-gpu/):
#   the losses' forward + backward at 8k and 32k tokens x vocab 151,936 in bf16, beside TRL's and
#   Liger Kernel's fused CE; one SFT step per loss at Qwen3-0.6B's shape (tokens/s, MFU), beside
#   stock TRL's SFTTrainer.
#     bash bench/gpu.sh [OUT]
# Each bench prints as it goes; a failing one does not stop the next.
set -uo pipefail
out=${1:-bench-gpu}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python3 -c "import torch, transformers, trl; print(torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA', 'transformers', transformers.__version__, 'trl', trl.__version__)" 2>&1 | tee "$out/versions.txt"
python3 bench/losses.py --tokens 8192 32768 --paths naive chunked trl liger --out "$out/losses.json" 2>&1 | tee "$out/losses.txt"
python3 bench/sft_step.py --qwen3-0.6b --seq 2048 --batch 4 --steps 4 2>&1 | grep -v "it/s]\|s/it]" | tee "$out/sft_step.txt"
