#!/usr/bin/env bash
# `make figures`: reruns every command whose numbers and figures the README shows, on the digits
# data that ships with scikit-learn, and copies the figures to docs/images/ under the names the
# README uses. The README's numbers are then copied from this script's output (figures.log).
#   usage: docs/figures.sh [PYTHON]
set -euo pipefail
cd "$(dirname "$0")/.."
py="${1:-.venv/bin/python}"
out=results/figures
rm -rf "$out"
mkdir -p "$out" docs/images
# Tiny models on a 2-core machine: one thread avoids the thread pool's overhead (see README).
export OMP_NUM_THREADS=1 MPLBACKEND=Agg PYTHONUNBUFFERED=1
run() { echo "\$ dldna-fused $*"; "$py" -m dldna_fused "$@" --no-progress; echo; }
{
  date -u +"%Y-%m-%d %H:%M UTC"
  run compare --dataset digits --model mlp --optimizers sgd,adam,lion,sophia,adafactor --epochs 5 --out "$out/compare"
  run compare --dataset digits --model cnn --optimizers sgd,adam,lion,sophia,adafactor --epochs 5 --out "$out/compare_cnn"
  run compare --dataset digits --model transformer --optimizers sgd,adam,lion,sophia,adafactor --epochs 5 \
    --out "$out/compare_transformer"
  run init --dataset digits --out "$out/init"
  run landscape --extras all --out "$out/landscape"
  echo "\$ python benchmarks/lowbit_quality.py"; "$py" benchmarks/lowbit_quality.py --out "$out/lowbit"
  echo "\$ python benchmarks/lowbit_quality.py --bf16"; "$py" benchmarks/lowbit_quality.py --bf16 --out "$out/bf16"
} 2>&1 | tee "$out/figures.log"
cp "$out/compare/curves_test.png" docs/images/compare_digits_mlp_test.png
cp "$out/init/variance.png" docs/images/init_variance_digits.png
for f in surface_hessian_contour surface_hessian_3d surface_random_contour surface_random_3d interpolation \
         weight_space_pca weight_space_tsne gaussian_fit optimizer_paths multiscale persistence dynamics; do
  cp "$out/landscape/$f.png" "docs/images/landscape_$f.png"
done
cp "$out/lowbit/lowbit_quality.png" docs/images/lowbit_quality.png
cp "$out/bf16/bf16_quality.png" docs/images/bf16_quality.png
echo "figures copied to docs/images; numbers in $out/figures.log"
