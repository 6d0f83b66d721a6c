"""Mamba's chunked selective scan against the sequential reference, in outputs and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.text.mamba import MambaBlock, MambaConfig, selective_scan_parallel, selective_scan_ref

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _inputs(L: int, dtype: torch.dtype, Bsz: int = 2, D: int = 6, N: int = 4, dt_shift: float = 0.0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(Bsz, L, D, generator=g, dtype=dtype)
    delta = F.softplus(torch.randn(Bsz, L, D, generator=g, dtype=dtype) + dt_shift)
    A = -torch.rand(D, N, generator=g, dtype=dtype) * 5 - 0.1
    B = torch.randn(Bsz, L, N, generator=g, dtype=dtype)
    C = torch.randn(Bsz, L, N, generator=g, dtype=dtype)
    Dskip = torch.randn(D, generator=g, dtype=dtype)
    return [t.requires_grad_() for t in (u, delta, A, B, C, Dskip)]


def _outputs_and_grads(scan, inputs, seed: int = 1, **kwargs):
    y, h = scan(*inputs, return_last_state=True, **kwargs)
    g = torch.Generator().manual_seed(seed)
    gy = torch.randn(y.shape, generator=g, dtype=y.dtype)
    gh = torch.randn(h.shape, generator=g, dtype=h.dtype)
    grads = torch.autograd.grad((y, h), inputs, (gy, gh))
    return (y, h, *grads)


NAMES = ("y", "last_state", "d_u", "d_delta", "d_A", "d_B", "d_C", "d_D")


@pytest.mark.parametrize("L", [1, 5, 8, 13, 32, 45])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_parallel_scan_equals_reference(L, dtype, tol):
    inputs = _inputs(L, dtype)
    ref = _outputs_and_grads(selective_scan_ref, inputs)
    par = _outputs_and_grads(selective_scan_parallel, inputs, chunk_size=8)  # 5, 13, 45: not multiples of 8
    for name, a, b in zip(NAMES, par, ref):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m, name=name: f"{name} (L={L}): {m}")


@pytest.mark.parametrize("chunk_size", [1, 3, 16, 100])
def test_parallel_scan_does_not_depend_on_chunk_size(chunk_size):
    inputs = _inputs(29, torch.float64)
    ref = _outputs_and_grads(selective_scan_ref, inputs)
    par = _outputs_and_grads(selective_scan_parallel, inputs, chunk_size=chunk_size)
    for name, a, b in zip(NAMES, par, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=lambda m, name=name: f"{name}: {m}")


def test_parallel_scan_is_stable_with_large_steps():
    # dt ~ 30 and |A| up to 5: sum(dt) |A| inside one chunk is ~2000, where exp(-A S) would overflow any
    # float; the chunked scan only ever exponentiates non-positive numbers
    inputs = _inputs(40, torch.float32, dt_shift=30.0)
    ref = _outputs_and_grads(selective_scan_ref, inputs)
    par = _outputs_and_grads(selective_scan_parallel, inputs, chunk_size=16)
    for name, a, b in zip(NAMES, par, ref):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


def test_block_gradients_parallel_equal_sequential():
    # the whole Mamba block (in_proj, conv, dt_proj, A_log, D, out_proj, norm), both scans, float64
    cfg = MambaConfig(vocab_size=5, d_model=8, d_state=4, chunk_size=4)
    torch.manual_seed(0)
    block = MambaBlock(cfg).double()
    x = torch.randn(2, 11, 8, dtype=torch.float64, requires_grad=True)
    params = [x, *block.parameters()]
    results = {}
    for scan in ("parallel", "sequential"):
        block.mixer.cfg.scan = scan
        y = block(x)
        results[scan] = (y, *torch.autograd.grad(y.pow(2).sum(), params))
    for a, b in zip(results["parallel"], results["sequential"]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
