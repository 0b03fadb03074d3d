#!/usr/bin/env bash
# The whole GPU matrix in one call on the GPU machine; every result lands in $OUT as soon as it exists.
#
#   OUT=/path bash benchmarks/run_gpu_matrix.sh [stage ...]      (from the repository root)
#
# Stages (default: all, in this order):
#   env      nvidia-smi and library versions
#   backbone backbone error per precision and per stage, fused vs unfused convolutions (backbone.json)
#   search   knn exactness vs the FP32 search, candidate-kernel speed vs cuBLAS (search.json)
#   trained  train anomalib PatchCore (WRN50, CPU) on generated data; cuda backend vs FP32 on it (trained.json)
#   bench    the benchmark table beside anomalib's eager module (bench/bench.{md,csv,json,png})
#   profile  torch.profiler: GPU time per stage and kernel (profile.txt)
#   hostdev  img/s host-to-host beside device-resident, pipelined and not; memory of one graph per batch size
#            (host_vs_device.json)
#   exact    exact mode's convolution paths against its targets and the exact bar (exact_speed.json); every
#            convolution of WRN50 by the Triton kernels in each precision against FP64 (layers.json)
#   line     many products: a line against separate models on tritonserver, GPU instances (gpu_line_products.*;
#            needs the nvidia-pytriton and tritonclient wheels in .whl/)
#   tests    the GPU tests (test_gpu, test_cuda_backend, test_exact_search compiled, the contract and label tests,
#            the Triton convolutions and the pruned scan compiled) with anomalib; golden checkpoints from
#            $PATCHCORE_TRT_FIXTURES (tests.txt)
# Wheels for packages the machine lacks (anomalib for the baseline row and the tests) are installed from .whl/ or
# .whl/*/ if present.
set -uo pipefail
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
wheels=$(compgen -G ".whl/*.whl"; compgen -G ".whl/*/*.whl")
if [ -n "$wheels" ]; then
  # shellcheck disable=SC2086  # one word per wheel file
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $wheels
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/src:${PYTHONPATH:-} HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 MALLOC_MMAP_THRESHOLD_=1048576
BENCH_ARGS=${BENCH_ARGS:-"--precision fp32,fp16 --search certified,fp16 --batch 1,16"}
log=$OUT/log.txt
run() { echo "=== $* ($(date -u +%T))" | tee -a "$log"; "$@" 2>&1 | tee -a "$log"; }
for stage in ${*:-env backbone search trained bench profile hostdev}; do
  case $stage in
    env) run nvidia-smi
         run python3 -c "import torch, triton, timm; print(torch.__version__, torch.version.cuda,
torch.backends.cudnn.version(), triton.__version__, timm.__version__, torch.cuda.get_device_name())" ;;
    backbone) run python3 benchmarks/backbone_error.py "$OUT/backbone.json" ${BACKBONE_PARTS:-errors,timing} ;;
    search) run python3 benchmarks/check_search.py "$OUT/search.json" ${TUNE:-} ;;
    trained) run python3 benchmarks/check_trained.py /tmp/trained "$OUT/trained.json" ;;
    bench) run python3 -m patchcore_trt bench --synthetic --backends cuda --sizes 256,512 --bank 16384,32768 \
             $BENCH_ARGS -o "$OUT/bench" ;;
    profile) run python3 benchmarks/profile_cuda.py "$OUT/profile.txt" fp16,fp32 ;;
    hostdev) run python3 benchmarks/profile_cuda.py --host-vs-device "$OUT/host_vs_device.json" ;;
    exact) run python3 benchmarks/exact_speed.py --out "$OUT/exact_speed.json"
           run python3 benchmarks/backbone_error.py "$OUT/layers.json" layers ;;
    line) run python3 benchmarks/line_products.py --kind gpu --out "$OUT" --name gpu_line_products ;;
    tests) run python3 -m pytest -q -rs -p no:cacheprovider tests/test_gpu.py tests/test_cuda_backend.py \
             tests/test_exact_search.py tests/test_contract.py tests/test_labels.py tests/test_staging.py \
             tests/test_conv_kernels.py tests/test_prune.py \
             | tee "$OUT/tests.txt" ;;
    *) echo "unknown stage $stage" | tee -a "$log" ;;
  esac
done
