"""Every op runs on meta tensors and under FakeTensorMode on every backend, with the real op's shapes and dtypes.

FakeTensorMode fails on any data-dependent host read (.item(), .tolist(), nonzero, boolean
masks), so passing here proves the ops never synchronise with the device.
"""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import dymu_kernels as dk
from conftest import backend_params

B, N, C, D, N0 = 3, 11, 8, 16, 30


def dtome_inputs(device):
    return dict(
        x=torch.randn(B, N, D, device=device, dtype=torch.float16),
        metric=torch.randn(B, N, C, device=device),
        size=torch.ones(B, N, device=device),
        lengths=torch.tensor([N, 4, 0], dtype=torch.int32, device=device) if device != "meta" else torch.empty(B, dtype=torch.int32, device=device),
        pos_map=torch.zeros(B, N0, dtype=torch.int32, device=device),
    )


def run_all(device, backend):
    a = dtome_inputs(device)
    node_max, node_idx = dk.bipartite_similarity(a["metric"], a["lengths"], protect_first=True, backend=backend)
    assert node_max.shape == (B, 6) and node_max.dtype == torch.float32 and node_idx.dtype == torch.int32
    row_map, new_len = dk.select_edges(node_max, node_idx, a["lengths"], 0.5, N, backend=backend)
    assert row_map.shape == (B, N) and row_map.dtype == torch.int32 and new_len.shape == (B,)
    x, size = dk.scatter_merge(a["x"], a["size"], row_map, new_len, backend=backend)
    assert x.shape == (B, N, D) and x.dtype == torch.float16 and size.dtype == torch.float32
    res = dk.dtome_merge(a["x"], a["metric"], a["size"], a["lengths"], torch.zeros(B, device=device),
                         pos_map=a["pos_map"], protect_first=True, backend=backend)
    assert res.x.shape == (B, N, D) and res.pos_map.shape == (B, N0) and res.lengths.dtype == torch.int32
    tau = dk.batch_threshold(node_max, 2, backend=backend)
    assert tau.shape == () and tau.dtype == torch.float32
    q = torch.randn(B, 4, 5, 8, device=device, dtype=torch.bfloat16)
    kv = torch.randn(B, 2, 5, 8, device=device, dtype=torch.bfloat16)
    cos = torch.randn(9, 8, device=device)
    out = dk.vtu_attention(q, kv, kv, cos, cos, torch.zeros(B, 9, dtype=torch.int64, device=device), backend=backend)
    assert out.shape == q.shape and out.dtype == torch.bfloat16


@pytest.mark.parametrize("backend", backend_params("dtome_merge"))
def test_on_meta_tensors(backend):
    # Meta tensors reach the registered fake kernels of torch.ops.dymu.<op> for every backend.
    run_all("meta", backend)


@pytest.mark.parametrize("backend", backend_params("dtome_merge"))
def test_under_fake_tensor_mode(backend):
    with FakeTensorMode():
        run_all("cpu", backend)
