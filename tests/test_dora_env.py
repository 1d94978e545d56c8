"""Environment variables: valid values honoured, invalid ones rejected naming variable, value and
what is accepted; the plugin's enable/disable and its version check."""

from __future__ import annotations

import pytest
import torch

from dora_testing import TARGET, ours, ours_env

CASES = {
    "PEFT_DORA_FUSED": [("1", "fused", True), ("0", "fused", False), ("", "fused", None)],
    "PEFT_DORA_FUSED_BACKWARD": [("1", "fused_backward", True), ("0", "fused_backward", False)],
    "PEFT_DORA_NORM_CHUNK_MB": [("16", "norm_chunk_mb", 16), ("1024", "norm_chunk_mb", 1024)],
    "PEFT_DORA_FWD_CHUNK_MB": [("64", "fwd_chunk_mb", 64)],
    "PEFT_DORA_NORM_CACHE": [("0", "norm_cache", False), ("1", "norm_cache", True)],
    "DORA_AUTOTUNE_COMPREHENSIVE": [("1", "autotune_comprehensive", True)],
    "PEFT_DORA_ALLOW_PARTIAL_GATHER": [("1", "allow_partial_gather", True)],
    "PEFT_FORCE_GATHER": [("0", "force_gather", False), ("1", "force_gather", True)],
}
BAD = {
    "PEFT_DORA_FUSED": ["yes", "2", "true"],
    "PEFT_DORA_FUSED_BACKWARD": ["on"],
    "PEFT_DORA_NORM_CHUNK_MB": ["15", "abc", "-1", "1.5"],
    "PEFT_DORA_FWD_CHUNK_MB": ["8", "x"],
    "PEFT_DORA_NORM_CACHE": ["off"],
    "DORA_AUTOTUNE_COMPREHENSIVE": ["2"],
    "PEFT_DORA_ALLOW_PARTIAL_GATHER": ["True"],
    "PEFT_FORCE_GATHER": ["always"],
}


def test_defaults():
    cfg = ours_env().DoraEnvConfig.from_mapping({})
    assert (cfg.fused, cfg.fused_backward, cfg.force_gather) == (None, None, None)
    assert (cfg.norm_chunk_mb, cfg.fwd_chunk_mb, cfg.norm_cache) == (256, 256, True)
    assert not cfg.autotune_comprehensive and not cfg.allow_partial_gather


def test_every_variable_has_cases():
    assert set(CASES) == set(ours_env().ENV_VARS) == set(BAD)


@pytest.mark.parametrize("name,raw,field,value", [(n, r, f, v) for n, cases in CASES.items() for r, f, v in cases])
def test_valid_values(monkeypatch, name, raw, field, value):
    monkeypatch.setenv(name, raw)
    assert getattr(ours_env().get_config(), field) == value


@pytest.mark.parametrize("name,raw", [(n, r) for n, bad in BAD.items() for r in bad])
def test_invalid_values_raise_naming_the_problem(monkeypatch, name, raw):
    monkeypatch.setenv(name, raw)
    with pytest.raises(ValueError) as info:
        ours_env().get_config()
    message = str(info.value)
    assert name in message and repr(raw) in message and "accepted" in message


def test_invalid_value_surfaces_at_forward(monkeypatch):
    layer = ours().DoraLinearLayer(fan_in_fan_out=False)
    base = torch.nn.Linear(4, 3)
    A, B = torch.nn.Linear(4, 2, bias=False), torch.nn.Linear(2, 3, bias=False)
    layer.update_layer(base_layer=base, lora_A=A.weight, lora_B=B.weight, scaling=1.0)
    monkeypatch.setenv("PEFT_DORA_NORM_CHUNK_MB", "tiny")
    with pytest.raises(ValueError, match="PEFT_DORA_NORM_CHUNK_MB"):
        layer(torch.randn(2, 4), lora_A=A, lora_B=B, scaling=1.0, base_layer=base, base_result=base(torch.randn(2, 4)))


def test_config_override_and_fields_validated():
    env = ours_env()
    with env.config_override(norm_chunk_mb=32) as cfg:
        assert env.get_config() is cfg and cfg.norm_chunk_mb == 32
    assert env.get_config() is not cfg
    with pytest.raises(ValueError, match="norm_chunk_mb"):
        env.DoraEnvConfig(norm_chunk_mb=8)
    with pytest.raises(TypeError, match="fused"):
        env.DoraEnvConfig(fused="yes")


def test_norm_cache_env_turns_cache_off(monkeypatch):
    layer = ours().DoraLinearLayer(fan_in_fan_out=False)
    W, A, B = torch.randn(6, 5), torch.randn(2, 5), torch.randn(6, 2)
    monkeypatch.setenv("PEFT_DORA_NORM_CACHE", "0")
    layer.row_norm(W, A, B, 1.0)
    assert layer._norm_cache.norm is None
    monkeypatch.setenv("PEFT_DORA_NORM_CACHE", "1")
    n1 = layer.row_norm(W, A, B, 1.0)
    assert layer.row_norm(W, A, B, 1.0) is n1  # served from the cache
    with torch.no_grad():
        A.add_(1.0)  # in-place edit moves the version counter
    assert not torch.equal(layer.row_norm(W, A, B, 1.0), n1)


@pytest.mark.skipif(TARGET != "plugin", reason="the plugin is not used in the patched tree")
def test_plugin_enable_disable_and_context():
    import dorafactors
    from peft.tuners.lora import variants

    original = variants.DoraLinearLayer
    assert not dorafactors.is_enabled()
    with dorafactors.enabled():
        assert variants.DoraLinearLayer is ours().DoraLinearLayer
        assert variants.DoraLinearVariant.__module__.endswith("dora_variants")
        with dorafactors.enabled(False):
            assert variants.DoraLinearLayer is original
        assert variants.DoraLinearLayer is ours().DoraLinearLayer
    assert variants.DoraLinearLayer is original and not dorafactors.is_enabled()
    dorafactors.enable()
    dorafactors.enable()  # idempotent
    dorafactors.disable()
    assert variants.DoraLinearLayer is original


@pytest.mark.skipif(TARGET != "plugin", reason="the plugin is not used in the patched tree")
def test_plugin_rejects_unsupported_peft(monkeypatch):
    import peft

    import dorafactors

    monkeypatch.setattr(peft, "__version__", "0.17.1")
    with pytest.raises(RuntimeError, match=r"0\.18\.0.*0\.22\.0.*0\.17\.1"):
        dorafactors.enable()
    assert not dorafactors.is_enabled()


def test_readme_table_matches_the_config_module():
    """README's table is the documentation of record: it must list every variable with its default
    and accepted values exactly as dora_env.ENV_VARS does."""
    from dora_testing import REPO_ROOT

    path = REPO_ROOT / "README.md"
    if not path.is_file():
        pytest.skip("no README.md here (the suite runs inside a patched PEFT tree)")
    readme = path.read_text()
    for name, (default, accepted, effect) in ours_env().ENV_VARS.items():
        row = f"| `{name}` | {default} | {accepted} | {effect} |"
        assert row in readme, f"README row missing or stale for {name}: expected {row!r}"
