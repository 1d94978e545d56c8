"""Shared fixtures: which DoRA is under test (the plugin or a patched PEFT tree) and the reference.

``DORAFACTORS_TARGET=plugin`` (default) tests ``dorafactors.*`` installed into upstream PEFT;
``DORAFACTORS_TARGET=patched`` tests a PEFT tree patched with hf.patch (put its ``src`` on
PYTHONPATH), whose ``peft.tuners.lora.dora`` is ours.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

# Without CUDA the Triton kernels run in Triton's CPU interpreter. Triton fixes interpreted vs
# compiled when triton.language is first imported (which transformers or peft may do at import),
# so the switch is thrown here, before any test module is imported. Auto dispatch still keeps CPU
# tensors on the eager path; only tests that force the fused path run kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dora_testing import TARGET, load_reference  # noqa: E402


def pytest_report_header(config):
    import peft
    import torch

    return f"dorafactors target: {TARGET}; peft {peft.__version__} from {Path(peft.__file__).parent}; torch {torch.__version__}"


@pytest.fixture(scope="session")
def reference():
    """PEFT 0.18.0's dora.py (fetched to vendor/ by code/scripts/fetch_reference.py)."""
    return load_reference()


@pytest.fixture(autouse=True)
def _seed():
    import torch

    torch.manual_seed(int(os.environ.get("DORAFACTORS_TEST_SEED", "0")))
    yield
