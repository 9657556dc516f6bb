#!/usr/bin/env bash
# GPU section of docs/training.md: peak memory and step time of the multi-token training step (bench
# memory) and training throughput / MFU against n (bench train), in bf16 autocast.
#
#   bash benchmarks/gpu_train.sh            # everything (about 6-8 minutes on one H100/H200)
#   bash benchmarks/gpu_train.sh compare    # only the n=1 vs n=4 comparison (the reference H200 setting)
#   bash benchmarks/gpu_train.sh sweep      # only peak memory against n for V in {256, 32k, 128k}
#   bash benchmarks/gpu_train.sh train      # only bench train at ~125M parameters
#   bash benchmarks/gpu_train.sh compare --vocab 32000 --repeats 1    # extra flags override the defaults
#
# Flags after the part are appended to every bench command of that part (argparse keeps the last value),
# e.g. `--device cpu --dtype fp32 --dim 64 ...` for a CPU smoke run (then no CUDA device is required).
# Each benchmark's JSON document (its last stdout line) goes to $OUT (default ./bench_out), next to the full
# log and the PNGs. Redraw plots later with: python -m multitoken.bench.plots $OUT/*.json --out docs
set -euo pipefail

part="${1:-all}"
shift $(( $# > 0 ? 1 : 0 ))
extra=("$@")
out="${OUT:-./bench_out}"
mkdir -p "$out"
PY="${PYTHON:-python3}"  # the interpreter with PyTorch (PYTHON=... for another one)
# The working tree's package, installed or not (no `pip install -e .`, so no network access is needed).
export PYTHONPATH="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/src${PYTHONPATH:+:$PYTHONPATH}"

if [[ " ${extra[*]} " != *" --device cpu "* ]]; then
    "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: this script is for a GPU machine')"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
fi

# run NAME TAG FLAGS...: `multitoken bench NAME FLAGS... EXTRA...`; the log to $out/TAG.log, the JSON
# document (last line) to $out/TAG.json
run() {
    local name="$1" tag="$2"; shift 2
    "$PY" -m multitoken bench "$name" "$@" "${extra[@]}" | tee "$out/$tag.log"
    tail -n 1 "$out/$tag.log" > "$out/$tag.json"
}

# Cross-entropy chunks of 1024 tokens, as `train` (loss_chunk): 8 chunks per head at batch 4 x 2048, each a
# 1024-row product; the CPU tables' 128 would make 64 small ones.
common=(--device cuda --dtype bf16 --batch 4 --context 2048 --warmup 3 --steps 10 --chunk 1024)

if [[ "$part" == all || "$part" == compare ]]; then
    # The reference setting: d=1024, 8 blocks, V=32k, batch 4x2048 (H200: 8.58 / 11.08 / 8.43 GiB, 0.043 /
    # 0.054 / 0.062 s for n=1 / n=4 summed / n=4 sequential). Also V=128k.
    run memory memory_compare --part compare --dim 1024 --layers 8 --vocab 32000,128256 --n 4 --repeats 2 \
        "${common[@]}"
fi
if [[ "$part" == all || "$part" == sweep ]]; then
    # Peak memory against n: 12 blocks so that n=8 keeps a 4-block trunk. Summed-loss n=8 at V=128k needs
    # ~70 GB of logits and may run out of memory on an H100: that row then reads "out of memory".
    run memory memory_sweep --part sweep --dim 1024 --sweep-layers 12 --sweep-vocab 256,32000,128256 \
        --sweep-n 1,2,4,8 --plot-dir "$out" "${common[@]}"
fi
if [[ "$part" == all || "$part" == train ]]; then
    # ~134M parameters (d=768, 12 blocks, V=32k, untied), the paper's Table S5 layout; MFU against the
    # table's dense bf16 peak (989 TFLOP/s for H100 SXM / H200).
    run train train --dim 768 --layers 12 --vocab 32000 --n-list 1,2,4,8 --method chunked --chunk 1024 --device cuda \
        --dtype bf16 --batch 8 --context 2048 --warmup 3 --steps 10 --repeats 2 --plot-dir "$out"
fi
echo "results in $out"
