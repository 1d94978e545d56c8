#!/usr/bin/env bash
# Check hf.patch end to end (CPU; ~2 minutes on 2 cores; network: PyPI only, once, for the peft sdist).
#
#   bash code/scripts/check_hf_patch.sh
#
# 1. hf.patch is current: regenerating it from src/dorafactors/ and tests/ gives the same bytes.
# 2. `git apply --check hf.patch` passes on the upstream 20a9829 export and on the peft==0.18.0 sdist.
# 3. vendor/dorafactors-peft/ is built (sdist + hf.patch) and `import peft.tuners.lora.dora*` works.
# 4. In both patched trees (the vendor tree, and a patched copy of the 20a9829 export in a temp dir),
#    with PYTHONPATH=<tree>/src:
#    a. upstream's own tests that touch DoRA, selected by UPSTREAM_K below from
#       tests/test_custom_models.py and tests/test_lora_variants.py;
#    b. our tests as shipped in the tree (tests/dorafactors_tests/, DORAFACTORS_TARGET=patched).
#
# UPSTREAM_K: every DoRA case (pytest's -k is case-insensitive, so "dora" also matches "DoRA" in the
# test ids) plus all of test_lora_variants.py, where the hook lives; minus the five tests that load
# real models from the Hugging Face Hub (gpt2, the remapping test's model, the aLoRA gradient
# checkpointing tests' model), which cannot run without network.
#
# How the tests are run in a patched tree, and why:
# - -c <our minimal ini>: upstream's pytest configuration is not used. The 20a9829 pyproject has
#   both [tool.pytest] and [tool.pytest.ini_options], which pytest 9 refuses to load; both trees'
#   addopts need pytest-cov; the sdist's turns transformers' FutureWarnings into errors, and peft
#   0.18.0's own PeftModel.__init__ calls an API that transformers 5 deprecated (our tests, which
#   build small transformers models, hit it).
# - --rootdir <tree> --confcutdir <tree>: with the ini file elsewhere, pytest would otherwise load
#   no conftest.py of the tree, and -k would also match the tree's directory name
#   ("dorafactors-peft" contains "dora") and select every test; a guard below checks the count.
# - --import-mode=importlib: the sdist ships tests/ without __init__.py, yet the tests import each
#   other relatively (`from .testing_common import ...`); importlib mode gives them their package.
# - HF_HUB_OFFLINE=1: nothing is downloaded; without it Hub lookups hang on network time-outs.
# - a compatibility shim (COMPAT below): upstream's testing_utils.hub_online_once mock-patches
#   transformers.utils.hub._is_offline_mode, which transformers 5 removed; the shim defines it, so
#   the ~250 tests using that context manager run instead of erroring. It changes no behaviour.
# Logs: vendor/check_hf_patch/*.log (git-ignored), kept after the run.
# Needs upstream's test dependencies beyond ours: diffusers and datasets (imported at the top of
# upstream's tests/testing_common.py and testing_utils.py).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO"
PY="${PYTHON:-python}"
UPSTREAM="${DORAFACTORS_UPSTREAM:-$REPO/../shared/upstream/peft-20a9829.tar.gz}"
UPSTREAM_K="dora or test_lora_variants"
UPSTREAM_K="($UPSTREAM_K) and not test_gpt2_dora_merge_and_unload and not test_dora_save_and_load_remapping"
UPSTREAM_K="$UPSTREAM_K and not test_gradient_checkpointing_double_forward_raises"
UPSTREAM_K="$UPSTREAM_K and not test_gradient_checkpointing_dpo_doesnt_raise"
UPSTREAM_FILES=(tests/test_custom_models.py tests/test_lora_variants.py)
# Upstream's tests run under this plugin: the transformers-5 shim, and proof that the patched tree
# is the PEFT under test and that its variants are ours. Our own tests run without it (their
# conftest must set TRITON_INTERPRET before anything imports triton, so nothing may import peft first).
COMPAT='
import sys, pytest
class Compat:
    def pytest_configure(self, config):
        import transformers.utils.hub as hub
        if not hasattr(hub, "_is_offline_mode"):
            hub._is_offline_mode = False  # mock.patch target of upstream hub_online_once (gone in transformers 5)
        import peft
        from peft.tuners.lora import dora_variants, variants
        assert variants.DoraLinearVariant is dora_variants.DoraLinearVariant, "variants are not ours"
        print(f"peft {peft.__version__} from {peft.__file__}; DoRA variants from {dora_variants.__file__}")
sys.exit(pytest.main(sys.argv[1:], plugins=[Compat()]))
'

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
LOGS="$REPO/vendor/check_hf_patch"
rm -rf "$LOGS" && mkdir -p "$LOGS"
printf '[pytest]\naddopts =\n' >"$TMP/pytest.ini"
if ! "$PY" -c "import diffusers, datasets" 2>/dev/null; then
  echo "upstream PEFT's tests need diffusers and datasets: $PY -m pip install diffusers datasets" >&2
  exit 1
fi
T0=$SECONDS
SUMMARY=()
FAILED=0
step() { printf '\n== [%4ds] %s\n' "$((SECONDS - T0))" "$*"; }
record() { SUMMARY+=("$(printf '%-58s %s' "$1" "$2")"); }

# pytest in a patched tree: run_pytest upstream|ours NAME TREE ARGS... ; records pytest's closing line
run_pytest() {
  local kind="$1" name="$2" tree="$3"; shift 3
  local runner=(-m pytest)
  if [ "$kind" = upstream ]; then runner=(-c "$COMPAT"); fi
  local log="$LOGS/$(echo "$name" | tr -c 'a-zA-Z0-9' _ | tr -s _).log" rc=0 t=$SECONDS
  (cd "$tree" && HF_HUB_OFFLINE=1 PYTHONPATH="$tree/src" "$PY" "${runner[@]}" -q -p no:cacheprovider \
      -c "$TMP/pytest.ini" --rootdir "$tree" --confcutdir "$tree" --import-mode=importlib "$@") >"$log" 2>&1 || rc=$?
  grep -E '^(FAILED|ERROR) ' "$log" | head -40 || true
  local last; last="$(grep -E '(passed|failed|error|no tests ran)' "$log" | tail -1 || true)"
  echo "$last  [$((SECONDS - t))s]"
  # 0 = all passed; anything else (1 failures, 2-4 usage/internal, 5 nothing collected) fails the check
  if [ "$rc" -ne 0 ]; then FAILED=1; tail -30 "$log"; echo "log: $log"; fi
  record "$name" "rc=$rc  $last  [$((SECONDS - t))s]"
}

step "1. hf.patch is current"
"$PY" code/scripts/make_hf_patch.py --upstream "$UPSTREAM" -o "$TMP/hf.patch"
if ! cmp -s hf.patch "$TMP/hf.patch"; then
  diff -u hf.patch "$TMP/hf.patch" | head -40 || true
  echo "hf.patch is stale: run  python code/scripts/make_hf_patch.py  and commit hf.patch" >&2
  exit 1
fi
record "hf.patch current" "ok"

step "2. git apply --check on the 20a9829 export and on the peft==0.18.0 sdist"
mkdir -p "$TMP/export" "$TMP/sdist"
tar -xzf "$UPSTREAM" -C "$TMP/export"
EXPORT_TREE="$(find "$TMP/export" -mindepth 1 -maxdepth 1 -type d | head -1)"
SDIST="$("$PY" code/scripts/build_vendor_peft.py --sdist-only)"
tar -xzf "$SDIST" -C "$TMP/sdist"
SDIST_TREE="$(find "$TMP/sdist" -mindepth 1 -maxdepth 1 -type d | head -1)"
for tree in "$EXPORT_TREE" "$SDIST_TREE"; do
  # GIT_CEILING_DIRECTORIES: never let git apply find an enclosing repository (it would then
  # resolve paths against that repository's root)
  (cd "$tree" && GIT_CEILING_DIRECTORIES="$TMP" git apply --check -v "$REPO/hf.patch" >/dev/null)
  echo "git apply --check OK: $(basename "$tree")"
  record "git apply --check $(basename "$tree")" "ok"
done

step "3. build vendor/dorafactors-peft"
"$PY" code/scripts/build_vendor_peft.py
VENDOR_TREE="$REPO/vendor/dorafactors-peft"
(cd "$EXPORT_TREE" && GIT_CEILING_DIRECTORIES="$TMP" git apply "$REPO/hf.patch")
record "vendor tree built, peft.tuners.lora.dora* import" "ok"

for tree in "$VENDOR_TREE" "$EXPORT_TREE"; do
  if [ "$tree" = "$VENDOR_TREE" ]; then label="vendor (peft 0.18.0 sdist)"; else label="20a9829 export"; fi
  step "4a. upstream DoRA tests, patched $label"
  run_pytest upstream "upstream DoRA tests, $label" "$tree" "${UPSTREAM_FILES[@]}" -k "$UPSTREAM_K"
  # guard against a -k that silently selects (nearly) everything: the DoRA subset is ~500 of ~8800
  ran="$(echo "${SUMMARY[-1]}" | grep -oE '[0-9]+ (passed|failed|skipped|error)' | awk '{s += $1} END {print s + 0}')"
  if [ "$ran" -gt 1500 ]; then echo "UPSTREAM_K selected $ran tests: expected the DoRA subset" >&2; FAILED=1; fi
  step "4b. our shipped tests, patched $label"
  if [ -d "$tree/tests/dorafactors_tests" ]; then
    run_pytest ours "our tests (shipped), $label" "$tree" tests/dorafactors_tests
  else
    record "our tests (shipped), $label" "none shipped"
  fi
done

step "summary"
printf '%s\n' "${SUMMARY[@]}"
printf 'total %ds\n' "$((SECONDS - T0))"
exit "$FAILED"
