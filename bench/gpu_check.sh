#!/usr/bin/env bash
# Distributed checks on a GPU machine: DDP, FSDP, DeepSpeed ZeRO-2/3, one rank per GPU (NCCL and the HF Trainer
# put rank r on cuda:r, so several ranks cannot share one GPU; with one GPU every check runs 1 rank).
# Writes $OUT/gpu_check/summary.md (+ summary.tsv and one log per check); never stops at a failure.
# Needs a CUDA build of torch (+ deepspeed) in PYTHON's environment.
#
#   bash bench/gpu_check.sh            # from the repository root, with .venv (or PYTHON=...) holding CUDA torch
#   OUT=/tmp/x NPROC=4 bash bench/gpu_check.sh
#
# Checks (each under `timeout`, CHECK_TIMEOUT seconds, default 240):
#   ops-zero2 / ops-zero3 / ops-fsdp-trainer: tests/test_distributed_ops_engines.py on CUDA: per-sample losses and
#       fast gradient features inside a DeepSpeed / FSDP engine built by the HF Trainer, on NPROC ranks, equal a
#       1-process run on the bare model.
#   ops-fsdp2: the same with torch FSDP2 (`fully_shard`) on CUDA.
#   train-ddp / train-zero2 / train-zero3 / train-fsdp: `FORCE_TORCHRUN=1 NPROC_PER_NODE=NPROC datasteer train`
#       on the quickstart (demo model, 20 steps, ODM mixer), one run dir with the steering state in checkpoint-10.
#   cpu-suite (CPU_SUITE=1 only): the CPU distributed tests (DDP/FSDP gloo, DeepSpeed CPU accelerator).
#   grad-features (GRAD_BENCH=1 only): bench/grad_features.py on cuda:0 with the ~20M and the "large" (~270M)
#       Llama, LoRA and full; results in $OUT/grad_features/grad_features.{json,md}. Give it GRAD_TIMEOUT seconds
#       (default 1200): the exact Gram matrix of the large model alone is ~10 TFLOP plus ~60 GB of host memory.
# Budget: about 8 checks of 0.5-2 min each once the machine is up (CHECK_TIMEOUT caps each).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
OUT=${OUT:-bench/results}/gpu_check
CHECK_TIMEOUT=${CHECK_TIMEOUT:-240}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=2 TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}

NGPU=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
NPROC=${NPROC:-$((NGPU >= 8 ? 8 : (NGPU >= 1 ? NGPU : 1)))}
SUMMARY="$OUT/summary.tsv"
printf "check\tresult\tseconds\tlog\n" > "$SUMMARY"
{
  echo "# gpu_check $(date -u +%FT%TZ)"
  echo
  echo "host: $(hostname); GPUs: $NGPU; ranks per multi-GPU check: $NPROC"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | sed 's/^/- /'
  "$PYTHON" - <<'PY' 2>&1
import importlib
for m in ("torch", "transformers", "accelerate", "deepspeed"):
    try:
        print(f"- {m} {importlib.import_module(m).__version__}")
    except Exception as e:  # noqa: BLE001
        print(f"- {m}: not importable ({type(e).__name__})")
import torch
print(f"- cuda {torch.version.cuda}, nccl {torch.cuda.nccl.version() if torch.cuda.is_available() else '-'}")
PY
} > "$OUT/header.md"

run_check() {  # name, command...
  local name=$1; shift
  local log="$OUT/$name.log" start end rc result
  start=$(date +%s)
  timeout "$CHECK_TIMEOUT" "$@" > "$log" 2>&1; rc=$?
  end=$(date +%s)
  case $rc in 0) result=pass ;; 124) result="TIMEOUT (${CHECK_TIMEOUT}s)" ;; *) result="FAIL (rc $rc)" ;; esac
  printf "%s\t%s\t%s\t%s\n" "$name" "$result" "$((end - start))" "$(basename "$log")" >> "$SUMMARY"
  echo "[gpu_check] $name: $result ($((end - start)) s)"
}

skip_check() {  # name, reason
  printf "%s\tskipped: %s\t0\t-\n" "$1" "$2" >> "$SUMMARY"
  echo "[gpu_check] $1: skipped ($2)"
}

train_check() {  # name, nproc, extra overrides...
  local name=$1 nproc=$2; shift 2
  local dir="$OUT/runs/$name"
  rm -rf "$dir"
  run_check "$name" env FORCE_TORCHRUN=1 NPROC_PER_NODE="$nproc" MASTER_ADDR=127.0.0.1 \
    MASTER_PORT=$((29500 + RANDOM % 1000)) "$PYTHON" -m datasteer.cli train examples/quickstart.yaml \
    "train.output_dir=$dir" train.max_steps=20 train.save_steps=10 train.eval_steps=10 train.logging_steps=5 \
    train.use_cpu=false train.per_device_train_batch_size=4 steering.warmup_steps=4 \
    data.demo.samples_per_domain=60 "$@"
  if [ -f "$dir/checkpoint-10/steering_state.pt" ] && [ -f "$dir/steering/events.jsonl" ]; then
    echo "  run dir ok: $dir" >> "$OUT/$name.log"
  else
    sed -i "s/^$name\tpass\t/$name\tFAIL (no steering state in checkpoint-10)\t/" "$SUMMARY"
  fi
}

if [ "$NGPU" -ge 1 ]; then
  GPU_ENV=(env DATASTEER_TEST_DEVICE=cuda DATASTEER_TEST_NPROC="$NPROC" DS_ACCELERATOR=cuda)
  PYTEST=("$PYTHON" -m pytest -q -p no:cacheprovider tests/test_distributed_ops_engines.py)
  run_check ops-zero2 "${GPU_ENV[@]}" "${PYTEST[@]}" -k "deepspeed and zero2"
  run_check ops-zero3 "${GPU_ENV[@]}" "${PYTEST[@]}" -k "deepspeed and zero3"
  run_check ops-fsdp-trainer "${GPU_ENV[@]}" "${PYTEST[@]}" -k trainer_fsdp
  run_check ops-fsdp2 "${GPU_ENV[@]}" "${PYTEST[@]}" -k "fsdp2 and not uneven"
  train_check train-ddp "$NPROC"
  train_check train-zero2 "$NPROC" train.deepspeed=examples/deepspeed/ds_z2_config.json
  train_check train-zero3 "$NPROC" train.deepspeed=examples/deepspeed/ds_z3_config.json
  train_check train-fsdp "$NPROC" "train.fsdp=full_shard auto_wrap" \
    'train.fsdp_config={"transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"], "version": 2}'
else
  skip_check gpu "no CUDA device visible to torch"
fi
if [ "${GRAD_BENCH:-0}" = 1 ] && [ "$NGPU" -ge 1 ]; then
  CHECK_TIMEOUT=${GRAD_TIMEOUT:-1200} run_check grad-features "$PYTHON" bench/grad_features.py --device cuda \
    --models 20m,large --threads 8 --row-cap 0 --hold-mib 0 --base-samples 64 --out "$OUT/grad_features"
fi
if [ "${CPU_SUITE:-0}" = 1 ]; then  # the CPU distributed tests (already run on CPU machines), a few minutes
  run_check cpu-suite env DS_ACCELERATOR=cpu "$PYTHON" -m pytest -q -p no:cacheprovider -m distributed \
    tests/test_distributed.py tests/test_distributed_ops_engines.py tests/test_ops_distributed.py tests/test_launch.py
fi

{
  cat "$OUT/header.md"
  echo
  echo "| check | result | seconds | log |"
  echo "|---|---|---|---|"
  tail -n +2 "$SUMMARY" | awk -F'\t' '{printf "| %s | %s | %s | %s |\n", $1, $2, $3, $4}'
} > "$OUT/summary.md"
rm -f "$OUT/header.md"
cat "$OUT/summary.md"
grep -q "FAIL\|TIMEOUT" "$SUMMARY" && exit 1 || exit 0
