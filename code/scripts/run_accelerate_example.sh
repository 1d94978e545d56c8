#!/usr/bin/env bash
# The multi-GPU example (examples/accelerate_dora/train.py) under `accelerate launch`, with the FSDP2
# and the DeepSpeed ZeRO-3 configuration, ours and upstream PEFT's DoRA; logs land in $OUT.
#
#   OUT=/some/dir code/scripts/run_accelerate_example.sh [extra train.py arguments]   # default: --size 1b --steps 30
#
# DeepSpeed, if not installed, is taken from the wheels in .whl/ (see run_multigpu_check.sh).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export OUT="${OUT:-/tmp/accelerate_example}" TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null && [ ! -d /tmp/site/deepspeed ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH="/tmp/site:$ROOT/src:${PYTHONPATH:-}"
mkdir -p "$OUT"
ARGS=("$@")
[ ${#ARGS[@]} -eq 0 ] && ARGS=(--size 1b --steps 30)
status=0
for engine in fsdp2 zero3; do
  for impl in ours upstream; do
    log="$OUT/accelerate_${engine}_${impl}.log"
    echo "=== $engine, $impl -> $log"
    timeout "${EXAMPLE_TIMEOUT_S:-120}" python3 -m accelerate.commands.launch \
      --config_file "examples/accelerate_dora/$engine.yaml" --main_process_port $((29600 + RANDOM % 200)) \
      examples/accelerate_dora/train.py --impl "$impl" "${ARGS[@]}" >"$log" 2>&1 || status=1
    grep -E "^step|peak allocated|Error" "$log" | tail -8
  done
done
exit $status
