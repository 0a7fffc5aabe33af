#!/usr/bin/env bash
# The benchmarks behind BENCHMARKS.md, in sequence (each prints its table and writes bench/results/*.json).
# Not here: the full-SST-2 recipes (`oztune finetune --config configs/sst2-full*.yaml`, 17-42 min each) and
# bench/ensemble.py over their models. Needs a fine-tuned SST-2 model: MODEL=runs/sst2-8k, made below if missing
# with the command of BENCHMARKS' int8 section (2 epochs on 8,000 examples). Total: about 80 minutes on 2 cores
# (the compress search is most of it).
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-runs/sst2-8k}
mkdir -p bench/results
if [ ! -f "$MODEL/config.json" ]; then
  oztune finetune --train data/sst2/train.tsv --eval data/sst2/dev.tsv --output "$MODEL" \
      --epochs 2 --max-train-examples 8000 --label-names negative,positive --no-progress
fi
python bench/train_speed.py --pairs 3
python bench/profile_step.py
python bench/inference.py --model "$MODEL"
python bench/export_parity.py --model "$MODEL"
python bench/int8.py --model "$MODEL" --compile --aot
oztune quantize --model "$MODEL" --output "$MODEL-int8"
python bench/calibration.py --model "$MODEL" --model "$MODEL-int8" --label-smoothing 0.1
python bench/compiled.py --model "$MODEL-int8"
python bench/load.py --model "$MODEL-int8"
oztune export --model "$MODEL-int8" --output "$MODEL-int8-aot" --format aoti
python bench/load.py --model "$MODEL-int8-aot" --backends torch --out bench/results/load_aot.json
python bench/compress.py --model "$MODEL" --output "$MODEL-compressed"
python bench/load.py --model "$MODEL-compressed" --out bench/results/load_compressed.json
python bench/lora.py
python bench/lora.py --rank 8 --out bench/results/lora_r8.json
python bench/ddp.py
