#!/usr/bin/env bash
# One run on a machine with an NVIDIA GPU (the device tool's H200): build with CUDA in place against
# the machine's own torch (no installs, no network), run the CUDA tests, run the benchmark.
# Writes build.log, tests.log, bench.txt, bench.json and a summary to OUTDIR.
#   usage: benchmarks/gpu_check.sh OUTDIR
#
# It must fit one 10-minute call on the lent machine (16 cores, its own python3 with torch 2.11,
# pytest, scipy, scikit-learn, matplotlib, tqdm; no gudhi or pywavelets, whose tests skip; nothing
# can be installed). Expected, not yet measured on that machine: build ~4 min (the CUDA TUs in
# parallel, MAX_JOBS=16), tests ~3 min, benches ~1.5 min. Each phase has its own time limit
# below, so a slow phase costs its own results and not the rest; summary.txt records each
# phase's seconds, for the next run to replace these estimates.
set -uo pipefail
out="${1:?usage: benchmarks/gpu_check.sh OUTDIR}"
mkdir -p "$out"
cd "$(dirname "$0")/.."
py="${PYTHON:-python3}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" DLDNA_FUSED_CUDA=1 MAX_JOBS="${MAX_JOBS:-16}"
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
# Optional peers for the tests that compare with them (torchao's CPUOffloadOptimizer with our
# classes, test_offload.py): PEERS=DIR, made with `pip install --no-deps --target DIR
# torchao==0.18.0` and carried with the run. Without it those tests skip.
if [ -n "${PEERS:-}" ]; then export PYTHONPATH="$(realpath "$PEERS")${PYTHONPATH:+:$PYTHONPATH}"; fi

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; "$py" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'; } | tee "$out/summary.txt"

start=$SECONDS
phase() { echo "$1: $((SECONDS - start)) s since start" | tee -a "$out/summary.txt"; }

# In place: the .so lands next to the package, so `import dldna_fused` from the repo root finds it.
if ! timeout 300 "$py" setup.py build_ext --inplace > "$out/build.log" 2>&1; then
  tail -40 "$out/build.log"; echo "BUILD FAILED" | tee -a "$out/summary.txt"; exit 1
fi
phase "build ok"

# The 2-process gloo tests (CPU only, the slowest file) run in CI; here the CUDA tests and
# everything else, within 200 s.
timeout 200 "$py" -m pytest python_tests -q -p no:cacheprovider --ignore python_tests/test_distributed.py \
  > "$out/tests.log" 2>&1
echo "tests exit $?: $(tail -1 "$out/tests.log")" | tee -a "$out/summary.txt"
# The offload wrapper's GPU-only lines (side streams, pinned buffers) and torchao's wrapper.
timeout 60 "$py" -m pytest python_tests/test_offload.py -q -p no:cacheprovider -rs -k "cuda or torchao" \
  > "$out/offload_tests.log" 2>&1
echo "offload GPU tests exit $?: $(tail -1 "$out/offload_tests.log")" | tee -a "$out/summary.txt"
phase "tests done"

timeout 60 "$py" -m dldna_fused bench --device cuda --optimizer adamw,lion,sophia,adafactor --no-progress --json "$out/bench.json" > "$out/bench.txt" 2>&1
echo "bench exit $?" | tee -a "$out/summary.txt"
# Gradient clipping: the fused norm/scale ops and max_grad_norm folded into the step.
timeout 60 "$py" -m dldna_fused bench --device cuda --optimizer adamw --clip --no-progress --json "$out/bench_clip.json" >> "$out/bench.txt" 2>&1
echo "clip bench exit $?" | tee -a "$out/summary.txt"
# 8-bit and 4-bit states (the CUDA parity tests against the CPU are in tests.log: test_lowbit.py).
timeout 60 "$py" -m dldna_fused bench --device cuda --optimizer adamw8bit,adamw4bit,lion8bit --no-progress --json "$out/bench_lowbit.json" >> "$out/bench.txt" 2>&1
echo "low-bit bench exit $?" | tee -a "$out/summary.txt"
# bf16 params written to nearest, stochastically rounded and Kahan-compensated (the parity of the
# CUDA writes with the CPU's is test_bf16_writes.py's, in tests.log).
timeout 60 "$py" -m dldna_fused bench --device cuda --optimizer adamw-bf16,adamw8bit-bf16 --no-progress --json "$out/bench_bf16.json" >> "$out/bench.txt" 2>&1
echo "bf16 writes bench exit $?" | tee -a "$out/summary.txt"
# AdaFactor at LLaMA-7B shapes (bf16): the step's peak workspace from the allocator, and its time.
timeout 60 "$py" benchmarks/adafactor_memory.py --device cuda --dtype bfloat16 > "$out/adafactor_memory.txt" 2>&1
echo "adafactor memory exit $?: $(tail -2 "$out/adafactor_memory.txt" | tr '\n' ' ')" | tee -a "$out/summary.txt"
phase "benches done"
cat "$out/bench.txt"
grep -E "FAILED|Error" "$out/tests.log" | head -20
