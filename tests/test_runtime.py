"""cct.runtime: threads, the allocator, precision and device choices."""
import platform

import pytest
import torch

from cct import runtime
from cct.runtime import (PRECISIONS, configure_threads, faster_precision, resolve_device, resolve_precision,
                         tune_allocator)


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


def test_precision_and_device(monkeypatch):
    assert PRECISIONS[0] == "auto" and resolve_precision("fp32") == "fp32"
    for native, expected in ((True, "bf16"), (False, "fp32")):  # auto: bf16 exactly where the CPU has it natively
        monkeypatch.setattr(runtime, "cpu_supports_bf16", lambda: native)
        assert resolve_precision("auto", "cpu") == expected and resolve_precision("fp32", "cpu") == "fp32"
    monkeypatch.undo()
    with pytest.raises(ValueError, match="fp16 is for CUDA"):
        resolve_precision("fp16", "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(AssertionError):
        resolve_precision("fp64")


@pytest.mark.parametrize("bf16_ms, expected", [(50.0, "bf16"), (95.0, "fp32"), (150.0, "fp32")])
def test_faster_precision_times_both_in_turns_on_a_virtual_clock(bf16_ms, expected):
    now, calls = [0.0], []

    def step(precision):  # each call moves the clock by that precision's step time
        calls.append(precision)
        now[0] += {"fp32": 100.0, "bf16": bf16_ms}[precision] / 1e3

    choice, ms = faster_precision(step, rounds=3, margin=0.9, clock=lambda: now[0])
    assert choice == expected  # 95 ms is within the margin of 100: a near tie goes to fp32
    assert ms == pytest.approx({"fp32": 100.0, "bf16": bf16_ms})
    assert calls == ["fp32", "bf16"] + ["fp32", "bf16"] * 3  # one untimed each, then timed in turns
