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
