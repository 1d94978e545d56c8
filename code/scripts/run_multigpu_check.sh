#!/usr/bin/env bash
# DoRA under FSDP2 and DeepSpeed ZeRO-3 on 2 GPUs (code/scripts/multigpu_check.py): loss and
# gradient agreement with one GPU (the whole-model bf16 run, and the like-for-like single-split-*
# reference), per-GPU peak memory against upstream PEFT's DoRA, the effect of
# PEFT_FORCE_GATHER / PEFT_DORA_ALLOW_PARTIAL_GATHER. JSON and a Markdown table land in $OUT.
# --dtype fp32 runs every phase in fp32.
#
#   OUT=/some/dir code/scripts/run_multigpu_check.sh [extra multigpu_check.py arguments]
#
# DeepSpeed is not on the GPU image: carry its wheel and its missing pure-Python dependencies in
# .whl/ (see the README, "Multi-GPU"); this script installs whatever is there into /tmp/site.
# NVLink multicast stays off in every process (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export OUT="${OUT:-$ROOT/code/results}" TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null && [ ! -d /tmp/site/deepspeed ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH="/tmp/site:$ROOT/src:${PYTHONPATH:-}"
NPROC="${NPROC:-2}"
mkdir -p "$OUT"
timeout "${CHECK_TIMEOUT_S:-470}" python3 -m torch.distributed.run --standalone --nproc_per_node "$NPROC" \
  code/scripts/multigpu_check.py --out "$OUT" "$@"
