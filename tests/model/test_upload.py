"""The threaded pinned-buffer copy of mapped weights onto a GPU (``model.upload``)."""

from __future__ import annotations

import pytest
import torch

from tlvr_cli.model.upload import upload

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_upload_lands_every_tensor_byte_for_byte_and_casts_only_floats():
    torch.manual_seed(0)
    tensors = {
        "big": torch.randn(3000, 1001, dtype=torch.bfloat16),  # several stage buffers, an odd tail
        "fp32": torch.randn(7, 5),
        "scalar": torch.tensor(2.5),
        "empty": torch.empty(0, 4),
        "ids": torch.arange(12, dtype=torch.int64).view(3, 4),
        "mask": torch.rand(17) > 0.5,
        **{f"small{i}": torch.randn(i + 1, 3, dtype=torch.float16) for i in range(20)},
    }
    device = torch.device("cuda")
    out = upload(tensors, device, torch.bfloat16, threads=3, stage_bytes=1 << 16)
    assert list(out) == list(tensors)
    for k, t in tensors.items():
        want = t.to(device, torch.bfloat16) if t.is_floating_point() else t.to(device)
        assert out[k].device.type == "cuda" and out[k].dtype == want.dtype and out[k].shape == t.shape, k
        assert torch.equal(out[k], want), k
    kept = upload(tensors, device)  # no dtype: as stored
    assert all(kept[k].dtype == t.dtype and torch.equal(kept[k].cpu(), t) for k, t in tensors.items())
