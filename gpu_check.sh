#!/usr/bin/env bash
# The first thing to run on a machine with a GPU: everything here was written and tested on CPUs only.
#     bash gpu_check.sh            # about 5-8 minutes on one GPU (an estimate: it has never run on one)
#     bash gpu_check.sh --dry-run  # print what it would run, run nothing (the test suite checks this on a CPU)
# It runs the suite on CUDA (the Triton kernels compiled, not interpreted), times the selective scan at the
# paper's shapes (Triton vs torch vs mamba_ssm when installed), checks that the transformer's attention
# reaches a fused kernel, trains AD with 2 processes under torchrun (NCCL on two GPUs; on one GPU over gloo,
# since NCCL refuses two processes on one device), and times AD updates in IEEE fp32, TF32 and bf16 for
# both archs. A step that fails is reported and the others still run; the summary at the end (also in
# runs/gpu_check/summary.txt) is what to paste into RESULTS.md.
set -uo pipefail
cd "$(dirname "$0")"

DRY=""
case "${1:-}" in
    --dry-run) DRY=1 ;;
    "") ;;
    *) echo "usage: bash gpu_check.sh [--dry-run]" >&2; exit 2 ;;
esac
OUT=runs/gpu_check
GPUS=$(python -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
if [[ $GPUS == 0 && -z $DRY ]]; then
    echo "error: no CUDA GPU here; gpu_check.sh is for a machine with one (--dry-run prints what it would run)" >&2
    exit 1
fi
if [[ $GPUS -ge 2 ]]; then  # one process per GPU, NCCL: rank 1's kernels must launch on GPU 1
    DDP_DEVICE=(--device cuda)
else                        # both processes on GPU 0: NCCL refuses that, gloo carries CUDA tensors
    DDP_DEVICE=(--device cuda:0 --dist-backend gloo)
fi
[[ -z $DRY ]] && mkdir -p "$OUT"
STATUS=()

step() {  # step NAME COMMAND...: run it, its output to the screen and to $OUT/NAME.log
    local name=$1
    shift
    echo "+ $*"
    [[ -n $DRY ]] && return
    if "$@" 2>&1 | tee "$OUT/$name.log"; then
        STATUS+=("ok      $name")
    else
        STATUS+=("FAILED  $name (see $OUT/$name.log)")
    fi
}

step environment python -c "
import importlib.util, torch
print('torch', torch.__version__, 'CUDA', torch.version.cuda, '|', torch.cuda.device_count(), 'GPU(s):',
      ', '.join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())))
for name in ('triton', 'mamba_ssm'):
    print(name, 'installed' if importlib.util.find_spec(name) else 'not installed')"
step suite python -m pytest test_all.py -q -x
step scan python bench.py scan --device cuda --shapes 16x768x5000 16x1024x10000 --repeats 3
step attention python -c "
import torch, torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
q = torch.randn(16, 4, 5000, 42, device='cuda')  # Reacher's transformer at the paper's size: 4 heads of 42
for dtype in (torch.float32, torch.bfloat16):
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        try:
            with sdpa_kernel(backend):
                F.scaled_dot_product_attention(*(q.to(dtype),) * 3, is_causal=True)
            verdict = 'runs'
        except RuntimeError:
            verdict = 'refused'
        print(f'{str(dtype):>15}, head size 42: {backend.name} {verdict}')"
step ddp-data python sac.py --env point_goal --tasks 4 --steps 1000 --device cuda --out "$OUT/data"
step ddp torchrun --standalone --nproc_per_node 2 ad.py --env point_goal --data "$OUT/data" --out "$OUT/ddp" \
    "${DDP_DEVICE[@]}" --k 2 --epochs 3 --eval-every 1000 --val-tasks 2 --val-seeds 1 --batch-size 4
step ad-speed python bench.py ad --env reacher_goal --device cuda --batch 8 --length 2000 \
    --dtypes fp32-strict fp32 bf16 --updates 3 --repeats 2

[[ -n $DRY ]] && exit 0
{
    echo "## gpu_check.sh on $(date -u +%Y-%m-%d)"
    cat "$OUT/environment.log"
    printf '%s\n' "${STATUS[@]}"
    echo; echo "### suite"; tail -n 3 "$OUT/suite.log"
    echo; echo "### selective scan (bench.py scan)"; cat "$OUT/scan.log"
    echo; echo "### attention kernels"; cat "$OUT/attention.log"
    echo; echo "### 2-process AD (${DDP_DEVICE[*]})"; grep -E "updates of|best validation" "$OUT/ddp.log"
    echo; echo "### AD updates/s (bench.py ad)"; cat "$OUT/ad-speed.log"
} | tee "$OUT/summary.txt"
