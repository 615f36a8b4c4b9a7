"""Copies to the device that do not stall the host (``runtime.host_to_device``, ``runtime.take_rows``)."""

from __future__ import annotations

import pytest
import torch

from tlvr_cli.runtime import host_to_device, take_rows


def test_rows_are_taken_in_the_order_asked_repeats_included():
    t = torch.arange(12).view(6, 2)
    cpu = torch.device("cpu")
    assert torch.equal(take_rows(t, [4, 0, 4], cpu), t[[4, 0, 4]])
    assert take_rows(t, [], cpu).shape == (0, 2)
    assert host_to_device(t, cpu) is t  # already there: no copy


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_copies_and_row_picks_on_cuda_never_synchronize():
    t = torch.randn(6, 3)
    cuda = torch.device("cuda")
    on_gpu = t.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        copied = host_to_device(t, cuda)
        from_host = take_rows(t, [5, 1], cuda)
        from_gpu = take_rows(on_gpu, [5, 1], cuda)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert copied.device.type == from_host.device.type == from_gpu.device.type == "cuda"
    assert torch.equal(copied.cpu(), t)
    assert torch.equal(from_host.cpu(), t[[5, 1]]) and torch.equal(from_gpu.cpu(), t[[5, 1]])
