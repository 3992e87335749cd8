"""Triton kernels give the same bytes as the torch path (TRITON_INTERPRET=1 on CPU here)."""

import pytest
import torch

from kvmw.quantizers import decode_blob, make_codec
from kvmw.quantizers import triton_kernels

pytestmark = pytest.mark.skipif(not triton_kernels.available(), reason="triton is not installed")


def _both(monkeypatch, fn):
    monkeypatch.delenv("KVMW_TRITON_ON_CPU", raising=False)
    ref = fn()
    monkeypatch.setenv("KVMW_TRITON_ON_CPU", "1")
    got = fn()
    monkeypatch.delenv("KVMW_TRITON_ON_CPU")
    return ref, got


@pytest.mark.parametrize("spec", ["int8", "int8:ktoken", "int4:g32", "int4:g64", "kivi2:g32", "kivi4:g16", "kivi4:g32"])
@pytest.mark.parametrize("tokens", [16, 21])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_same_bytes_as_torch(monkeypatch, spec, tokens, dtype):
    torch.manual_seed(tokens)
    kv = (torch.randn(2, 2, tokens, 2, 32) * torch.linspace(0.05, 6, 32)).to(dtype)
    kv[:, 0, :, :, 2] += 40  # an outlier key channel
    kv[0, 1, 3] = 0  # an all-zero token row (zero scale)
    assert triton_kernels.use_triton(kv) is False
    blob_ref, blob_tri = _both(monkeypatch, lambda: bytes(make_codec(spec).encode(kv, "f" * 32)))
    assert blob_tri == blob_ref
    out_ref, out_tri = _both(monkeypatch, lambda: decode_blob(blob_ref)[0])
    assert out_tri.dtype == out_ref.dtype == dtype
    assert torch.equal(out_tri, out_ref)


def test_kernels_are_used_for_their_devices(monkeypatch):
    monkeypatch.setenv("KVMW_TRITON_ON_CPU", "1")
    assert triton_kernels.use_triton(torch.zeros(1))
    monkeypatch.delenv("KVMW_TRITON_ON_CPU")
    assert not triton_kernels.use_triton(torch.zeros(1))
    assert triton_kernels.use_triton(torch.device("cuda")) == triton_kernels.available()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("spec", ["int8", "int4", "kivi2", "kivi4"])
def test_cuda_tensors_match_cpu_bytes(spec):
    torch.manual_seed(0)
    kv = torch.randn(4, 2, 128, 2, 64, dtype=torch.float16)
    cpu = bytes(make_codec(spec).encode(kv, "f" * 32))
    gpu = bytes(make_codec(spec).encode(kv.cuda(), "f" * 32))
    assert gpu == cpu
    out, _ = decode_blob(cpu, device="cuda")
    assert out.is_cuda and torch.equal(out.cpu(), decode_blob(cpu)[0])
