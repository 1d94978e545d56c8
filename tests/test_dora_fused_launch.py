"""The direct-launch gate (dora_fused_launch): which Triton launch hooks keep the JIT path."""

import pytest

pytest.importorskip("triton")

from dorafactors import dora_fused_launch as launch  # noqa: E402


def test_direct_launch_off_by_switch(monkeypatch):
    monkeypatch.setattr(launch, "_DIRECT_LAUNCH", False)
    assert not launch.direct_launch_allowed()


def test_empty_hook_chain_counts_as_no_hook(monkeypatch):
    """Triton >= 3.5 keeps an empty ``HookChain`` (never None) when no hook is set: the gate must
    still open, and close again once a profiler adds a hook."""
    import triton

    runtime = getattr(getattr(triton, "knobs", None), "runtime", None)
    if runtime is None:
        pytest.skip("this Triton has no knobs.runtime")
    monkeypatch.setattr(launch, "_DIRECT_LAUNCH", True)
    hook = runtime.launch_enter_hook
    if hook is not None and not hasattr(hook, "add"):
        pytest.skip("this Triton's launch hook is a plain attribute")
    if hook is not None and hook.calls:
        pytest.skip("a launch hook is already installed in this process")
    assert launch.direct_launch_allowed()

    def profiler_hook(metadata):  # pragma: no cover - never launched here
        pass

    if hook is None:
        monkeypatch.setattr(runtime, "launch_enter_hook", profiler_hook)
        assert not launch.direct_launch_allowed()
    else:
        hook.add(profiler_hook)
        try:
            assert not launch.direct_launch_allowed()
        finally:
            hook.remove(profiler_hook)
    assert launch.direct_launch_allowed()


@pytest.mark.parametrize("hook, expected", [(None, True), (lambda *a: None, False)])
def test_no_hook_on_plain_values(hook, expected):
    assert launch._no_hook(hook) is expected


@pytest.mark.parametrize("version, expected", [("3.5.1", False), ("3.6.0", True), ("3.9.0", True),
                                               ("3.10.0", False), ("3.7.0+gitabc", True), ("main", False)])
def test_direct_launch_only_on_triton_versions_whose_launcher_was_read(monkeypatch, version, expected):
    import triton

    monkeypatch.setattr(launch, "_DIRECT_LAUNCH", True)
    monkeypatch.setattr(launch, "_direct_state", {})
    monkeypatch.setattr(launch, "_no_hook", lambda hook: True)
    monkeypatch.setattr(triton, "__version__", version)
    assert launch.direct_launch_allowed() is expected


def test_a_refused_direct_launch_falls_back_to_the_jit_for_good(monkeypatch):
    """A launcher whose calling convention differs raises TypeError while parsing its arguments (nothing
    has run): that launch goes through the JIT, with one warning, and so do all later ones."""
    import torch

    class Compiled:
        packed_metadata, function = (), 0

        def run(self, *args):
            raise TypeError("function takes exactly 12 arguments")

    class Jit:
        arg_names = ["x", "n", "BLOCK"]

        def __init__(self):
            self.launches = []

        def __getitem__(self, grid):
            def launch_(*args, **kwargs):
                self.launches.append((grid, args, kwargs))
                return Compiled()
            return launch_

    monkeypatch.setattr(launch, "_DIRECT_LAUNCH", True)
    monkeypatch.setattr(launch, "_direct_state", {"version_ok": True})
    monkeypatch.setattr(launch, "_direct_cache", {})
    monkeypatch.setattr(launch, "_no_hook", lambda hook: True)
    monkeypatch.setattr(launch, "_raw_stream", lambda device: 0)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    jit, x = Jit(), torch.zeros(4)
    assert launch.direct_launch_allowed()
    launch.launch_direct(jit, ("k",), (1,), (x, 4), {}, {"BLOCK": 16})  # first: through the JIT, binary kept
    assert len(jit.launches) == 1 and len(launch._direct_cache) == 1
    with pytest.warns(RuntimeWarning, match="refused a direct launch"):
        launch.launch_direct(jit, ("k",), (1,), (x, 4), {}, {"BLOCK": 16})
    assert len(jit.launches) == 2 and jit.launches[-1][2] == {"BLOCK": 16}, "the refused launch did not run"
    assert not launch.direct_launch_allowed() and launch._direct_cache == {}


def test_specialization_key_separates_what_the_binary_depends_on():
    """Tensors by dtype and 16-byte alignment (a parameter like a tensor), integers by exact value,
    floats by type only: equal keys exactly when one compiled binary serves both calls."""
    import torch

    buf = torch.zeros(64)
    p = torch.nn.Parameter(torch.zeros(8))
    key = launch._specialization((buf, p, 4096, True, 0.5))
    assert key == ((torch.float32, True), (torch.float32, True), 4096, True, float)
    assert launch._specialization((buf, p, 4096, True, 2.0)) == key  # a float's value is not specialised
    assert launch._specialization((buf[1:], p, 4096, True, 0.5)) != key  # 4 bytes off alignment
    assert launch._specialization((buf.half(), p, 4096, True, 0.5)) != key
    assert launch._specialization((buf, p, 4097, True, 0.5)) != key
