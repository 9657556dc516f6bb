#!/usr/bin/env bash
# The one GPU entry point (docs/gpu.md): everything this project measures on a GPU, in one call that
# ends within a global time budget (default 480 s; GPU_SH_BUDGET=SECONDS to change it).
#
#   bash benchmarks/gpu.sh                # on a machine with one H100/H200; results under $OUT (default ./gpu_out)
#   bash benchmarks/gpu.sh --cpu-smoke    # the same steps at toy sizes on the CPU: does it run?
#   SMOKE_COMPILE=1 bash benchmarks/gpu.sh --cpu-smoke   # also the torch.compile part (~2 more minutes)
#
# Parts, in priority order (each under `timeout`; a part that fails or times out is recorded and the
# script goes on; parts that no longer fit the global budget are skipped):
#   gpu-info        nvidia-smi, torch and CUDA versions                            -> $OUT/gpu.txt
#   pytest-gpu      pytest -m gpu (bf16 divergences at near-ties on CUDA)
#   train           multitoken train: byte model (preset base, n=4, ~85M) on the stdlib, bf16 autocast,
#                   a fixed step count capped by a time budget
#   calibrate       multitoken calibrate --budget auto: head acceptance, and the draft tree with the highest
#                   expected speed given decoding steps timed on the card (RUN/tree.json)
#   gen-bf16-b1     multitoken bench generate: plain vs chain vs tree, bf16, batch 1, eager and with the step
#                   replayed from CUDA graphs (rows plain-g, chain-g, tree-g)
#   train-speed     bench train at ~134M parameters (d=768, 12 layers, V=32k), n = 1 and 4, blocks compiled:
#                   tokens/s and MFU (the 40% target)
#   memory-compare  bench memory at d=1024, 8 layers, V=32k, batch 4x2048, bf16 (the reference H200 setting)
#   numerics        benchmarks/gpu_generate.py: divergence report (fp32, bf16) and verify cost curve
#   gen-bf16-compile   the same as gen-bf16-b1 with the step compiled, and compiled + replayed (rows -c, -cg)
#   gen-bf16-batch, gen-fp32-b1, gen-fp32-batch   the decoding table in the other settings (with graphs)
# (The CPU smoke run has no CUDA graphs; it skips gen-bf16-compile unless SMOKE_COMPILE=1, and bf16-batch
# and fp32-b1.)
#
# $OUT gets 4 files: gpu.txt, log.txt (everything printed),
# summary.txt (part, status, seconds) and results.json ({part: the JSON document it printed last}),
# rewritten after every part so that a killed run still returns what finished.
set -euo pipefail

smoke=0
if [[ "${1:-}" == --cpu-smoke ]]; then smoke=1; elif [[ $# -gt 0 ]]; then echo "usage: $0 [--cpu-smoke]" >&2; exit 2; fi
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
out="${OUT:-$repo/gpu_out}"
mkdir -p "$out"
work="$(mktemp -d "${TMPDIR:-/tmp}/multitoken_gpu.XXXXXX")"
run_dir="$work/run"
PY="${PYTHON:-python3}"  # the interpreter with PyTorch (PYTHON=... for another one)
# The working tree's package, installed or not: no `pip install -e .` (its build would fetch setuptools), so
# the script runs without network access; the dependencies must already be installed (docs/gpu.md).
export PYTHONPATH="$repo/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
budget_total="${GPU_SH_BUDGET:-480}"
(( smoke )) && budget_total="${GPU_SH_BUDGET:-150}"
deadline=$(( SECONDS + budget_total ))
log="$out/log.txt"
: > "$log"
: > "$out/summary.txt"
exec > >(tee -a "$log") 2>&1

# part NAME BUDGET_S CMD...: run CMD under `timeout` (at most BUDGET_S, and never past the deadline);
# its output goes to the log and to $work/NAME.out, whose last line, if JSON, goes into results.json.
part() {
    local name="$1" budget="$2"; shift 2
    local left=$(( deadline - SECONDS ))
    if (( left < 15 )); then
        echo "== $name: skipped, the global budget of ${budget_total}s is spent"
        printf '%-18s %-14s %5s\n' "$name" skipped 0 >> "$out/summary.txt"
        return 0
    fi
    (( budget > left )) && budget=$left
    echo "== $name (at most ${budget}s): $*"
    local start=$SECONDS rc status
    set +e
    timeout -k 10 "$budget" "$@" 2>&1 | tee "$work/$name.out"
    rc=${PIPESTATUS[0]}
    set -e
    case $rc in 0) status=ok ;; 124|137) status=timeout ;; *) status="failed($rc)" ;; esac
    echo "== $name: $status after $(( SECONDS - start ))s"
    printf '%-18s %-14s %5d\n' "$name" "$status" $(( SECONDS - start )) >> "$out/summary.txt"
    "$PY" - "$work" "$out/results.json" <<'PY' || true
import json, sys
from pathlib import Path
results = {}
for f in sorted(Path(sys.argv[1]).glob("*.out"), key=lambda p: p.stat().st_mtime):
    lines = f.read_text(errors="replace").strip().splitlines()
    try:
        results[f.stem] = json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        results[f.stem] = None
for f in sorted(Path(sys.argv[1]).glob("*/*.json")):  # bench memory/train documents (gpu_train.sh)
    if f.parent.name in ("memory", "speed"):
        try:
            results[f"{f.parent.name}/{f.stem}"] = json.loads(f.read_text().strip().splitlines()[-1])
        except (json.JSONDecodeError, IndexError):
            pass
Path(sys.argv[2]).write_text(json.dumps(results, indent=1) + "\n")
PY
}

gpu_info() {
    if (( smoke )); then echo "cpu smoke run: no GPU"; else nvidia-smi; fi
    "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available()); print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')"
    git -C "$repo" log -1 --format='commit %H %s' 2>/dev/null || true
}
gpu_info 2>&1 | tee "$out/gpu.txt"
if (( ! smoke )) && ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "no CUDA device: run with --cpu-smoke on a machine without a GPU"; exit 1
fi

if (( smoke )); then
    export OMP_NUM_THREADS=1  # toy models on 2 shared CPU cores: a second thread made training 60x slower
    train_args=(--preset tiny --data "$repo/src/multitoken" --batch-size 4 --context 64 --max-steps 20
                --time-budget 30 --warmup 5)
    cal_args=(--budget auto --max-rank 2 --windows 4)
    gen_args=(--device cpu --threads 1 --prompts 2 --prompt-tokens 16 --max-new-tokens 16)
    compile_args=(--device cpu --threads 1 --prompts 1 --prompt-tokens 16 --max-new-tokens 8)
    numerics_args=(--device cpu --prompts 4 --prompt-tokens 16 --max-new-tokens 16 --block-sizes 1,2,4
                   --block-repeats 2)
    tiny=(--device cpu --dtype fp32 --dim 64 --layers 4 --vocab 256 --batch 1 --context 64 --warmup 1 --steps 1
          --repeats 1 --chunk 32 --threads 1)
    memory_args=("${tiny[@]}" --n 2)
    speed_args=("${tiny[@]}" --n-list 1,2)
    b=(20 30 30 15 45 45 60 150 0 0 20)
else
    # ~85M parameters (d=768, 12 blocks: 8 trunk + 4 heads, byte vocabulary). --time-budget caps the step
    # count on a slow or busy card; the log says how many steps ran.
    train_args=(--preset base --n-future 4 --batch-size 32 --context 256 --max-steps 1500 --time-budget 60
                --warmup 50 --lr 1e-3)
    cal_args=(--budget auto --max-rank 4 --windows 32 --device cuda --dtype bf16)
    gen_args=(--device cuda --prompts 4 --prompt-tokens 64 --max-new-tokens 128 --cuda-graphs)
    compile_args=(--device cuda --prompts 2 --prompt-tokens 64 --max-new-tokens 128 --cuda-graphs)
    numerics_args=(--device cuda --prompts 32 --prompt-tokens 64 --max-new-tokens 128)
    memory_args=(--vocab 32000 --repeats 1)
    speed_args=(--repeats 1 --n-list 1,4 --compile)
    b=(50 110 30 60 150 75 60 180 40 40 40)
fi

part pytest-gpu "${b[0]}" "$PY" -m pytest -m gpu -q -p no:cacheprovider tests/generate/test_numerics.py tests/generate/test_graphs.py
part train "${b[1]}" "$PY" -m multitoken train --out "$run_dir" "${train_args[@]}" --eval-every 100000 \
    --checkpoint-every 100000 --cache-dir "$work/cache" --quiet --sample-tokens 0
part calibrate "${b[2]}" "$PY" -m multitoken calibrate "$run_dir" "${cal_args[@]}" --cache-dir "$work/cache"
tree=()
[[ -f "$run_dir/tree.json" ]] && tree=(--tree)
# gen NAME BUDGET FLAGS...: `multitoken bench generate` on the run's held-out prompts (with its tree)
gen() {
    local name="$1" budget="$2"; shift 2
    part "$name" "$budget" "$PY" -m multitoken bench generate "$run_dir" "${tree[@]}" \
        --cache-dir "$work/cache" "$@"
}
gen gen-bf16-b1 "${b[3]}" "${gen_args[@]}" --dtype bf16
part train-speed "${b[4]}" env OUT="$work/speed" bash benchmarks/gpu_train.sh train "${speed_args[@]}"
part memory-compare "${b[5]}" env OUT="$work/memory" bash benchmarks/gpu_train.sh compare "${memory_args[@]}"
part numerics "${b[6]}" "$PY" benchmarks/gpu_generate.py "$run_dir" "${numerics_args[@]}" --cache-dir "$work/cache"
if (( ! smoke || ${SMOKE_COMPILE:-0} )); then  # on 2 busy CPU cores the three compilations take ~110 s
    gen gen-bf16-compile "${b[7]}" "${compile_args[@]}" --dtype bf16 --compile
fi
if (( ! smoke )); then
    gen gen-bf16-batch "${b[8]}" "${gen_args[@]}" --dtype bf16 --batch
    gen gen-fp32-b1 "${b[9]}" "${gen_args[@]}" --dtype fp32
fi
gen gen-fp32-batch "${b[10]}" "${gen_args[@]}" --dtype fp32 --batch

echo
echo "== summary (part, status, seconds; total $(( SECONDS ))s of ${budget_total}s)"
cat "$out/summary.txt"
# The decoding tables again, side by side, for the end of the reply.
"$PY" - "$out/results.json" <<'PY' || true
import json, sys
results = json.load(open(sys.argv[1]))
for name, doc in results.items():
    if isinstance(doc, dict) and "decoders" in doc:
        cells = "  ".join(f"{k} failed" if "error" in v else
                          f"{k} {v['tokens_per_second']:.0f}t/s {v['speedup']:.2f}x tpf {v['tokens_per_forward']:.2f}"
                          f" exact {v['exact']:.2f}" for k, v in doc["decoders"].items())
        print(f"{name:<18} {cells}")
    elif isinstance(doc, dict) and "dtypes" in doc:
        for dt, entry in doc["dtypes"].items():
            for key in ("divergence_chain", "divergence_tree"):
                r = entry.get(key)
                if r:
                    print(f"numerics {dt} {key[11:]}: {r['diverged']}/{r['prompts']} diverged, "
                          f"{r['diverged_at_near_tie']} at near-ties")
PY
rm -rf "$work"
sleep 1  # let the log's tee finish
