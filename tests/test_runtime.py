"""cct.runtime: threads, the allocator, precision and device choices."""
import platform

import pytest
import torch

from cct.runtime import PRECISIONS, configure_threads, resolve_device, resolve_precision, tune_allocator


def test_configure_threads():
    before = torch.get_num_threads()
    try:
        assert configure_threads(1) == 1 == torch.get_num_threads()
        assert configure_threads(2) == 2 == torch.get_num_threads()
        assert configure_threads() == 2  # no count: the current one stays
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_tune_allocator_on_glibc():
    assert tune_allocator() is True
    assert tune_allocator() is True  # idempotent


def test_precision_and_device():
    assert PRECISIONS[0] == "auto" and resolve_precision("fp32") == "fp32"
    assert resolve_precision("auto", "cpu") in ("bf16", "fp32")
    with pytest.raises(ValueError, match="fp16 is for CUDA"):
        resolve_precision("fp16", "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(AssertionError):
        resolve_precision("fp64")
