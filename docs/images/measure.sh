#!/usr/bin/env bash
# The closing-note measurement for issue 3, as it was run: DDPM 30 minutes alone on both cores; VAE and DCGAN
# 30 minutes each, side by side with one thread each; then classifier-FID/KID at n = 10000 beside the real-data
# floor, per-class accuracy of the conditional samples, and the grids shown in the README.
# Usage: bash docs/images/measure.sh [runs-folder]      (about 1.5 h on an idle 2-core machine)
set -euo pipefail
cd "$(dirname "$0")/../.."
AIGC=.venv/bin/aigc
RUNS=${1:-runs}
$AIGC image train-classifier                  # deterministic, stored as fmnist-classifier with its sha256
# DDPM: small UNet (1.1 M parameters), lr 1e-3, bfloat16 autocast (same loss curve as float32, ~1.5x faster here)
$AIGC image train --model ddpm --data fashion-mnist --out $RUNS/ddpm-30min --minutes 30 --conditional \
      --lr 1e-3 --dtype bfloat16 --threads 2 --seed 0 --quiet
for m in vae dcgan; do
  $AIGC image train --model $m --data fashion-mnist --out $RUNS/$m-30min --minutes 30 --conditional \
        --threads 1 --seed 0 --quiet &
done
wait
# 10000 samples x 25 DDIM steps x 2 (guidance) network passes: about 21 minutes on 2 cores
$AIGC image eval $RUNS/ddpm-30min  --n 10000 --sampler ddim --steps 25 --dtype bfloat16 --json \
      > $RUNS/ddpm-30min/eval.json
$AIGC image eval $RUNS/vae-30min   --n 10000 --json > $RUNS/vae-30min/eval.json
$AIGC image eval $RUNS/vae-30min   --n 10000 --temperature 0.8 --json > $RUNS/vae-30min/eval-t0.8.json
$AIGC image eval $RUNS/dcgan-30min --n 10000 --json > $RUNS/dcgan-30min/eval.json
for m in ddpm vae dcgan; do
  $AIGC image sample $RUNS/$m-30min --n 100 --class all --nrow 10 --seed 0 --out docs/images/$m-fmnist.png
  cp $RUNS/$m-30min/curves.png docs/images/$m-curves.png
done
$AIGC image interpolate $RUNS/vae-30min --steps 10 --rows 4 --seed 0 --out docs/images/vae-interpolate.png
$AIGC image interpolate $RUNS/dcgan-30min --steps 10 --rows 4 --seed 0 --out docs/images/dcgan-interpolate.png
