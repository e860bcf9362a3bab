"""symmetric_eigh falls back to float64 when float32 eigh fails or returns NaN."""

from __future__ import annotations

import pytest
import torch

from prunekit.criteria import eigh as eg


def _psd_with_dead_rows() -> torch.Tensor:
    """A float32 G-like factor: 6 of 10 units dead (zero rows and columns)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 40, generator=g)
    x[4:] = 0
    return (x @ x.T / 40).float()[None]


@pytest.mark.parametrize("failure", ["raises", "nan"])
def test_symmetric_eigh_retries_in_float64(monkeypatch, failure):
    m = _psd_with_dead_rows()
    real = torch.linalg.eigh
    calls = []

    def flaky(a):
        calls.append(a.dtype)
        if a.dtype == torch.float32:
            if failure == "raises":
                raise torch.linalg.LinAlgError("failed to converge")
            vals, vecs = real(a)
            return vals * float("nan"), vecs
        return real(a)

    monkeypatch.setattr(torch.linalg, "eigh", flaky)
    vals, vecs = eg.symmetric_eigh(m)
    assert calls == [torch.float32, torch.float64]
    assert vals.dtype == vecs.dtype == torch.float32
    assert bool(torch.isfinite(vals).all()) and bool((vals >= 0).all())
    rebuilt = (vecs * vals[..., None, :]) @ vecs.transpose(-1, -2)
    torch.testing.assert_close(rebuilt, m, atol=1e-5, rtol=1e-4)


def test_symmetric_eigh_keeps_the_float32_path_when_it_works(monkeypatch):
    m = _psd_with_dead_rows()
    calls = []
    real = torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda a: calls.append(a.dtype) or real(a))
    eg.symmetric_eigh(m)
    assert calls == [torch.float32]
