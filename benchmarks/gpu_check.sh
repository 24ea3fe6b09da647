#!/usr/bin/env bash
# The GPU measurements in one call (one NVIDIA GPU, at most 8 minutes): install, the Triton tests on
# CUDA, then PoolFormer-S12 at batch 128, 224 px: inference eager and torch.compile, training eager and
# compiled in bf16 autocast and fp32, and peak training memory; S36 and M48 only with time left.
#
#   bash benchmarks/gpu_check.sh [OUTDIR]      # logs to OUTDIR (default $OUT, else ./gpu_check_out)
#
# Stages run in order under one deadline (GPU_CHECK_BUDGET_S, default 480 s). The S12 stages' limits add
# up to the default budget, so one call measures everything the S12 tables need; the S36/M48 stages
# come after them. A stage that would start with under 30 s left is skipped and says so, so a second
# run can pick up the rest (GPU_CHECK_STAGES="name ..." runs only those stages).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-gpu_check_out}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
py=${PYTHON:-python3}
deadline=$((SECONDS + ${GPU_CHECK_BUDGET_S:-480}))
: >"$out/summary.log"
larger=(poolformer_s36 poolformer_m48)

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

# S12 first, sized so their limits add up to the 480 s default: compile rows carry a cold Inductor
# build (about a minute on a GPU host), eager rows are a few seconds each
stage tests 70 $py -m pytest tests/models/test_triton.py -q -x -p no:cacheprovider
stage inference_eager_s12 40 "${infer[@]}" --models poolformer_s12
stage inference_compile_s12 100 "${infer[@]}" --models poolformer_s12 --compile
stage training_eager_s12_bf16 30 "${train[@]}" --models poolformer_s12 --no-memory --dtype bfloat16
stage training_eager_s12_fp32 30 "${train[@]}" --models poolformer_s12 --no-memory
stage training_compile_s12_bf16 80 "${train[@]}" --models poolformer_s12 --compile --no-memory --dtype bfloat16
stage training_compile_s12_fp32 80 "${train[@]}" --models poolformer_s12 --compile --no-memory
stage training_memory_s12 50 "${train[@]}" --models poolformer_s12 --memory-rows "${triton_rows[@]}"
# with time left (or in a second call): the larger models, eager
stage inference_eager_large 90 "${infer[@]}" --models "${larger[@]}"
stage training_eager_large_bf16 80 "${train[@]}" --models "${larger[@]}" --no-memory --dtype bfloat16
stage training_eager_large_fp32 80 "${train[@]}" --models "${larger[@]}" --no-memory
cat "$out/summary.log"
