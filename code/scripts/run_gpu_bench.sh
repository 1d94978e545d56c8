#!/usr/bin/env bash
# Run one part of the GPU benchmark; each part fits one device-tool call (< ~8 minutes on an H100).
#
#   OUT=/some/dir code/scripts/run_gpu_bench.sh PART      # JSON lands in $OUT (default: code/results/)
#   code/scripts/run_gpu_bench.sh list                    # the parts
#
# Parts:
#   check              versions, GPU, reference SHA-1, what `--suite all` would run (seconds)
#   micro-bf16         norm, compose, layer, memory, stability in bf16, all shapes and ranks (2m23)
#   micro-fp16         the same in fp16 at fewer shapes and ranks
#   micro-fp32         the same in fp32 at fewer shapes and ranks
#   model8b-r384       Qwen3-VL-8B LM, full depth (36 layers), r=384 (5m37 on an H100)
#   model8b-r16        Qwen3-VL-8B LM, full depth, r=16
#   qwen2.5-vl-32b | qwen3-vl-32b | gemma-3-27b | mistral-small-3.2-24b
#                      that model's first 16 decoder layers, r=384 (qwen2.5-vl-32b: 4m44 on an H100)
#   qwen3.5-27b        its first 8 layers, r=384, 2 repeats (Gated-DeltaNet falls back to PyTorch
#                      without flash-linear-attention, as on our H100: slow, so fewer layers; about
#                      4 s per window of LoRA at 4 layers). If it runs over, add `--layers 4`.
#   models-other       the five above one after another (too long for one call; for a shell)
#   host               host cost per adapted linear (code/scripts/host_overhead_probe.py) with the GPU-gated
#                      host paths off and on, after their GPU tests (direct launches, compiled tail kernel:
#                      tests/test_dora_fused_gpu.py, tests/test_dora_fused_linear.py; report host-tests.txt)
#   qdora              QDoRA: the GPU tests of tests/test_dora_quant.py (report qdora-gpu-tests.txt/.xml in
#                      $OUT), then Qwen3-VL-8B LM, full depth, r=384, on an NF4 base with double
#                      quantization (bitsandbytes, QLoRA's setting): QLoRA, upstream PEFT 0.18.0 QDoRA,
#                      ours. Needs bitsandbytes (requirements.txt). If it runs over, add `--layers 18`.
#
# Extra arguments after PART go to the benchmark (e.g. `--providers lora,peft_ref,ours_auto`,
# `--repeats 5`). The repo's src/ is put on PYTHONPATH, so dorafactors need not be installed.
# On a copied tree set BENCH_GIT_COMMIT=<sha> so the JSON names the commit (it wins over a copied, possibly stale .git).
set -euo pipefail

PART="${1:-list}"
shift || true
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
OUT_DIR="${OUT:-$ROOT/code/results}"
PY="${PYTHON:-python}"
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
mkdir -p "$OUT_DIR"
BENCH=("$PY" "$ROOT/code/bench_dora_comprehensive.py" --out "$OUT_DIR")
SMALL_SHAPES="4096x4096,5120x27648,ragged"
SMALL_RANKS="16,384"

model_part() {  # model-name layers tag [extra...]
    local model="$1" layers="$2" tag="$3"
    shift 3
    "${BENCH[@]}" --suite model --dtype bf16 --models "$model" --layers "$layers" --ranks 384 --tag "$tag" "$@"
}

case "$PART" in
    list)
        awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"
        ;;
    check)
        nvidia-smi || true
        "$PY" -c "import torch, peft, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'); print('peft', peft.__version__, \
'transformers', transformers.__version__)"
        "$PY" "$ROOT/code/scripts/fetch_reference.py" --check
        "${BENCH[@]}" --list --suite all "$@"
        ;;
    micro-bf16)
        "${BENCH[@]}" --suite micro --dtype bf16 --tag micro-bf16 "$@"
        ;;
    micro-fp16)
        "${BENCH[@]}" --suite micro --dtype fp16 --shapes "$SMALL_SHAPES" --ranks "$SMALL_RANKS" --tag micro-fp16 "$@"
        ;;
    micro-fp32)
        "${BENCH[@]}" --suite micro --dtype fp32 --shapes "$SMALL_SHAPES" --ranks "$SMALL_RANKS" --repeats 10 \
            --tag micro-fp32 "$@"
        ;;
    model8b-r384)
        "${BENCH[@]}" --suite model --dtype bf16 --models qwen3-vl-8b --ranks 384 --tag qwen3-vl-8b-r384 "$@"
        ;;
    model8b-r16)
        "${BENCH[@]}" --suite model --dtype bf16 --models qwen3-vl-8b --ranks 16 --tag qwen3-vl-8b-r16 "$@"
        ;;
    qwen2.5-vl-32b | qwen3-vl-32b | gemma-3-27b | mistral-small-3.2-24b)
        model_part "$PART" 16 "$PART-L16-r384" "$@"
        ;;
    qwen3.5-27b)
        model_part "$PART" 8 "$PART-L8-r384" --repeats 2 "$@"
        ;;
    models-other)
        for m in qwen2.5-vl-32b qwen3-vl-32b gemma-3-27b mistral-small-3.2-24b; do
            model_part "$m" 16 "$m-L16-r384" "$@"
        done
        model_part qwen3.5-27b 8 "qwen3.5-27b-L8-r384" --repeats 2 "$@"
        ;;
    host)
        set +e
        (cd "$ROOT" && "$PY" -m pytest -q tests/test_dora_fused_gpu.py tests/test_dora_fused_linear.py \
            tests/test_dora_dispatch.py -p no:cacheprovider) 2>&1 | tee "$OUT_DIR/host-tests.txt"
        tests_rc=${PIPESTATUS[0]}
        set -e
        "$PY" "$ROOT/code/scripts/host_overhead_probe.py" --cprofile --no-fast-paths --out "$OUT_DIR/host_probe_slow.json" "$@"
        "$PY" "$ROOT/code/scripts/host_overhead_probe.py" --cprofile --fast-paths --out "$OUT_DIR/host_probe_fast.json" "$@"
        exit "$tests_rc"
        ;;
    qdora)
        set +e
        (cd "$ROOT" && "$PY" -m pytest -q -m gpu tests/test_dora_quant.py -p no:cacheprovider \
            --junitxml="$OUT_DIR/qdora-gpu-tests.xml") 2>&1 | tee "$OUT_DIR/qdora-gpu-tests.txt"
        tests_rc=${PIPESTATUS[0]}
        set -e
        "${BENCH[@]}" --suite model --dtype bf16 --models qwen3-vl-8b --ranks 384 --quant nf4-dq \
            --providers base,lora,peft_ref,ours_auto --tag qwen3-vl-8b-r384-nf4-dq "$@"
        exit "$tests_rc"
        ;;
    *)
        echo "unknown part '$PART'; run '$0 list'" >&2
        exit 2
        ;;
esac
