"""How the fused kernels are tuned and launched: autotune config lists, their pruning, and direct
launches of compiled binaries (no Triton JIT dispatch per call). Imports only torch at import time;
everything here is internal to :mod:`.dora_fused`."""

import warnings
from typing import Dict

import torch

__all__: list = []


def next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def autotune_configs(comprehensive: bool) -> Dict[str, list]:
    """Autotune configs per kernel: a short default list, or a wide sweep.

    Compose kernels are memory-bound tiles of [BLOCK_T, BLOCK_D]; the norm
    kernel tiles [BLOCK_D rows] x [BLOCK_R of r].
    """
    import triton

    Config = triton.Config
    if not comprehensive:
        # The winners of a CUDA-graph sweep on the H100 at T=4096, d_out 4096..27648
        # (code/results/diagnostics/kernel_sweep_h100.json): every forward tile here is within 1.3% of
        # the best at every d_out, the first three backward tiles within 6%; the last backward tile is
        # for short T (the pruning caps BLOCK_T by T). Few and close, so a noisy autotuning pick
        # cannot land far off.
        fwd = [(8, 512, 8), (8, 256, 8), (4, 512, 8), (8, 256, 4)]
        bwd = [(64, 128, 4), (64, 64, 4), (32, 128, 4), (8, 256, 4)]
        norm = [(64, 32, 4), (128, 32, 8), (64, 64, 4), (32, 64, 4), (128, 64, 8), (32, 16, 2)]

        def tiles(spec):
            return [Config({"BLOCK_T": t, "BLOCK_D": d}, num_warps=w, num_stages=1) for t, d, w in spec]

        return {"compose_fwd": tiles(fwd), "compose_bwd": tiles(bwd),
                "norm": [Config({"BLOCK_D": d, "BLOCK_R": r}, num_warps=w) for d, r, w in norm]}
    tiles = [(t, d, w, st) for t in (4, 8, 16, 32, 64) for d in (64, 128, 256, 512, 1024)
             for w in (2, 4, 8, 16) for st in (1, 2, 3) if 1024 <= t * d <= 16384 and t * d // (32 * w) >= 4]
    fwd = [Config({"BLOCK_T": t, "BLOCK_D": d}, num_warps=w, num_stages=st) for t, d, w, st in tiles]
    nrm = [Config({"BLOCK_D": d, "BLOCK_R": r}, num_warps=w, num_stages=st)
           for d in (16, 32, 64, 128) for r in (16, 32, 64, 128) for w in (2, 4, 8) for st in (1, 2, 3)
           if d * r <= 8192]
    return {"compose_fwd": fwd, "compose_bwd": list(fwd), "norm": nrm}


def interpreter_configs() -> Dict[str, list]:
    # The interpreter cannot benchmark; one small config keeps tests fast and still tiles.
    import triton

    Config = triton.Config
    return {"compose_fwd": [Config({"BLOCK_T": 16, "BLOCK_D": 64})],
            "compose_bwd": [Config({"BLOCK_T": 16, "BLOCK_D": 64})], "norm": [Config({"BLOCK_D": 16, "BLOCK_R": 16})]}


def lora_b_fwd_configs(comprehensive: bool, interp: bool) -> list:
    """Configs of the fused ``lora_B`` GEMM + compose forward: [BLOCK_T, BLOCK_D] output tiles
    accumulating over r in BLOCK_R slices (tensor-core shapes: every block at least 16)."""
    import triton

    Config = triton.Config
    if interp:
        return [Config({"BLOCK_T": 16, "BLOCK_D": 32, "BLOCK_R": 16, "PREFETCH_BASE": False})]
    # PREFETCH_BASE loads the base tile before the loop over r, where its latency can hide behind the
    # products; the autotuner took it for some r >= 128 shapes on the H100 and the epilogue load elsewhere
    # (diagnostics/lora_b_fwd_b16_h100.json)
    if not comprehensive:
        spec = [(128, 128, 32, 8, 3, False), (128, 128, 64, 8, 3, False), (64, 128, 64, 4, 3, False),
                (128, 64, 32, 4, 3, False), (64, 256, 32, 8, 3, False), (64, 64, 32, 4, 2, False),
                (32, 64, 16, 4, 2, False), (16, 64, 16, 4, 1, False),
                (128, 128, 64, 8, 3, True), (64, 128, 64, 4, 3, True), (128, 128, 32, 8, 4, True),
                (64, 128, 32, 4, 4, True)]
    else:
        spec = [(t, d, k, w, st, pf) for t in (16, 32, 64, 128) for d in (64, 128, 256) for k in (16, 32, 64)
                for w in (4, 8) for st in (1, 2, 3, 4) for pf in (False, True) if t * d <= 32768]
    return [Config({"BLOCK_T": t, "BLOCK_D": d, "BLOCK_R": k, "PREFETCH_BASE": pf}, num_warps=w, num_stages=st)
            for t, d, k, w, st, pf in spec]


def prune_lora_b_fwd(configs, named_args, **kwargs):
    return _prune_by_caps(configs, [("BLOCK_R", max(16, next_pow2(named_args["r"]))),
                                    ("BLOCK_T", max(16, next_pow2(named_args["T_BUCKET"]))),
                                    ("BLOCK_D", max(16, next_pow2(named_args["d_out"])))])


def _prune_by_caps(configs, caps):
    # Drop tiles far larger than the problem, one dimension at a time; never drop all.
    kept = list(configs)
    for key, cap in caps:
        fit = [c for c in kept if c.kwargs[key] <= cap]
        if fit:
            kept = fit
        else:
            smallest = min(c.kwargs[key] for c in kept)
            kept = [c for c in kept if c.kwargs[key] == smallest]
    return kept


def prune_compose(configs, named_args, **kwargs):
    return _prune_by_caps(configs, [("BLOCK_T", max(8, next_pow2(named_args["T_BUCKET"]))),
                                    ("BLOCK_D", max(64, next_pow2(named_args["d_out"])))])


def prune_norm(configs, named_args, **kwargs):
    return _prune_by_caps(configs, [("BLOCK_R", max(16, next_pow2(named_args["r"]))),
                                    ("BLOCK_D", max(16, next_pow2(named_args["d_out"])))])


# Direct launches of the compiled kernel. Triton's JIT entry re-derives, on every call, what the
# binary was specialised on (each argument's type, 16-byte pointer alignment, integer divisibility
# by 16 and equality to 1) to find it in its cache: ~30 µs of host time per launch on an H100 host,
# and the fused step is host-bound. Here the binary the JIT returned is kept under a key that
# determines all of that (each pointer's dtype and alignment, every integer's exact value, the
# device) and its launcher is called directly; any new key goes through the JIT once. Launch hooks
# (profilers such as Proton) keep the JIT path.
# On since its GPU test passed on an H100 (tests/test_dora_fused_gpu.py::test_direct_launch_matches_jit, bit-identical
# to the JIT launch incl. a misaligned pointer and a ragged T; code/results/gpu_tests/host-tests_h100_81b58b0.txt).
# The launcher's calling convention is read from Triton 3.6 and 3.9's sources, so other Triton versions
# keep the JIT path; a launcher that still refuses the call (TypeError, raised before anything runs)
# turns direct launches off for the process, with one warning. CPU CI (the interpreter) never takes
# this path.
_DIRECT_LAUNCH = True
_DIRECT_TRITON = ((3, 6), (3, 10))  # [low, high) of the Triton versions whose launcher was read
_direct_state: Dict[str, object] = {}  # "version_ok": bool, once; "refused": why the launcher refused
_direct_cache: Dict[tuple, tuple] = {}
_DIRECT_CACHE_MAX = 4096  # exact integers in the key: varying token counts add entries; start over past this


def _triton_version_ok() -> bool:
    ok = _direct_state.get("version_ok")
    if ok is None:
        import triton

        try:
            version = tuple(int(part) for part in triton.__version__.split(".")[:2])
        except ValueError:  # a development build's odd version string: not one we have read
            version = (0, 0)
        low, high = _DIRECT_TRITON
        ok = _direct_state["version_ok"] = low <= version < high
    return bool(ok)


def _runtime_knobs():
    """``triton.knobs.runtime`` (None on a Triton without knobs), looked up once: asked on every launch."""
    if "runtime" not in _direct_state:
        import triton

        _direct_state["runtime"] = getattr(getattr(triton, "knobs", None), "runtime", None)
    return _direct_state["runtime"]


def direct_launch_allowed() -> bool:
    if not _DIRECT_LAUNCH or "refused" in _direct_state or not _triton_version_ok():
        return False
    runtime = _runtime_knobs()  # the hooks themselves are read per launch: a profiler may set them any time
    return runtime is not None and _no_hook(runtime.launch_enter_hook) and _no_hook(runtime.launch_exit_hook)


def _no_hook(hook) -> bool:
    """No launch hook set: None, or (Triton >= 3.5) an empty ``HookChain``, which is never None.
    (Testing ``is None`` alone kept direct launches off on Triton 3.6: the H100 test caught it.)"""
    return hook is None or getattr(hook, "calls", None) == []


def _specialization(args: tuple) -> tuple:
    """What the binary was specialised on, per argument: a tensor's dtype and 16-byte alignment; an
    integer's exact value (covers == 1, % 16 and the i32/i64 choice); for a float only its type (passed
    as fp32, never specialised). One comprehension: this runs on every launch."""
    return tuple([(a.dtype, not a.data_ptr() & 15) if isinstance(a, _Tensor) else
                  (a if a.__class__ is not float else float) for a in args])


_Tensor = torch.Tensor


def launch_direct(jit_fn, full_key: tuple, grid: tuple, args: tuple, consts: dict, chosen: dict) -> None:
    """Launch ``jit_fn`` with ``args`` (its non-constexpr parameters, in order) and the constexprs in
    ``consts`` and ``chosen`` (the autotuned config) on ``grid``; ``full_key`` names the tuned call."""
    device = torch.cuda.current_device()
    dkey = (full_key, device, _specialization(args))
    hit = _direct_cache.get(dkey)
    if hit is None:
        compiled = jit_fn[grid](*args, **consts, **chosen)  # compiles or finds the binary, and launches
        if compiled is None or not hasattr(compiled, "packed_metadata"):
            return
        params = {**consts, **chosen}
        tail = tuple(params[p] for p in jit_fn.arg_names[len(args):])  # the constexprs, in signature order
        if len(_direct_cache) >= _DIRECT_CACHE_MAX:
            _direct_cache.clear()
        _direct_cache[dkey] = (compiled, tail)
        return
    compiled, tail = hit
    g1 = grid[1] if len(grid) > 1 else 1
    g2 = grid[2] if len(grid) > 2 else 1
    try:
        compiled.run(grid[0], g1, g2, _raw_stream(device), compiled.function, compiled.packed_metadata, None, None,
                     None, *args, *tail)
    except TypeError as exc:  # the launcher parses its arguments before launching: nothing ran
        _direct_state["refused"] = f"{type(exc).__name__}: {exc}"
        _direct_cache.clear()
        warnings.warn(f"dorafactors: Triton's launcher refused a direct launch ({exc}); launching through "
                      "Triton's JIT from now on", RuntimeWarning, stacklevel=2)
        jit_fn[grid](*args, **consts, **chosen)


try:  # what Triton's own launcher asks for the stream
    from torch._C import _cuda_getCurrentRawStream as _raw_stream
except ImportError:  # pragma: no cover - a torch without it
    def _raw_stream(device: int) -> int:
        return torch.cuda.current_stream(device).cuda_stream
