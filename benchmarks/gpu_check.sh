#!/usr/bin/env bash
# Issue 16's GPU measurements in one go (one NVIDIA GPU, about 8 minutes): install, the Triton tests
# on CUDA, then the inference and training tables for PoolFormer S12, S36 and M48 at batch 128,
# 224 px, fp32 and bf16, eager rows first and the torch.compile rows (S12) last.
#
#   bash benchmarks/gpu_check.sh [OUTDIR]      # logs to OUTDIR (default $OUT, else ./gpu_check_out)
#
# Stages run in order under one deadline (GPU_CHECK_BUDGET_S, default 480 s); a stage that would
# start with under 30 s left is skipped and says so, so a second run can pick up the rest
# (GPU_CHECK_STAGES="name ..." runs only those stages).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-gpu_check_out}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
py=${PYTHON:-python3}
deadline=$((SECONDS + ${GPU_CHECK_BUDGET_S:-480}))
: >"$out/summary.log"
models=(poolformer_s12 poolformer_s36 poolformer_m48)

# the machine has torch, triton and timm but no network: our package only, without dependencies
$py -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$out/install.log" 2>&1 ||
    export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
$py -c "import torch, triton, timm; print('torch', torch.__version__, 'triton', triton.__version__,
'timm', timm.__version__, torch.cuda.get_device_name())" 2>&1 | tee "$out/versions.log"

stage() {  # stage NAME LIMIT_S COMMAND...
    local name=$1 limit=$2 left=$((deadline - SECONDS))
    shift 2
    if [[ -n ${GPU_CHECK_STAGES:-} && " $GPU_CHECK_STAGES " != *" $name "* ]]; then return; fi
    if ((left < 30)); then
        echo "== $name: SKIPPED (${left}s left of the budget)" | tee -a "$out/summary.log"
        return
    fi
    ((limit > left)) && limit=$left
    echo "== $name (limit ${limit}s): $*"
    local start=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$out/$name.log"
    echo "== $name: exit ${PIPESTATUS[0]} after $((SECONDS - start))s" | tee -a "$out/summary.log"
}

infer=($py benchmarks/inference.py --device cuda --batch 128 --repeats 3 --runs 10)
train=($py benchmarks/training.py --device cuda --batch 128 --steps 5)
triton_rows=("timm (NCHW)" "ours (NCHW), Triton" "ours channels_last, Triton")

stage tests 150 $py -m pytest tests/models/test_triton.py -q -x -p no:cacheprovider
stage inference_eager 110 "${infer[@]}" --models "${models[@]}"
stage training_eager_fp32 80 "${train[@]}" --models "${models[@]}" --no-memory
stage training_eager_bf16 70 "${train[@]}" --models "${models[@]}" --no-memory --dtype bfloat16
stage inference_compile_s12 150 "${infer[@]}" --models poolformer_s12 --compile
stage training_compile_s12_bf16 120 "${train[@]}" --models poolformer_s12 --compile --no-memory --dtype bfloat16
stage training_memory_s12 60 "${train[@]}" --models poolformer_s12 --memory-rows "${triton_rows[@]}"
stage training_compile_s12_fp32 120 "${train[@]}" --models poolformer_s12 --compile --no-memory
cat "$out/summary.log"
