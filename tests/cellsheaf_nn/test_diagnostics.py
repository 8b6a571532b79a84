"""Diagnostics against dense reference computations: spectra, block energies, discord splits, residuals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import cellsheaf as cs
from cellsheaf_nn import diagnostics as dg
from tests.conftest import build_random_sheaf, dense_laplacian

F64 = torch.float64


# ---------------------------------------------------------------------------- generic sheaves


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), maps=st.sampled_from(["dense", "mixed", "nonlinear"]), batch=st.integers(1, 3))
def test_restricted_laplacians_match_dense_reference(seed, maps, batch):
    S = build_random_sheaf(seed, n_vertices=5, n_edges=7, maps=maps, weights=True)
    g = torch.Generator().manual_seed(seed)
    at = torch.randn(batch, S.C0, generator=g, dtype=F64)
    fixed = torch.randperm(S.C0, generator=g)[: S.C0 // 3].sort().values
    free = np.setdiff1d(np.arange(S.C0), fixed.numpy())
    L = dg.restricted_laplacians(S, fixed, at)
    assert L.shape == (batch, free.size, free.size)
    for b in range(batch):
        ref = dense_laplacian(S, at[b])[np.ix_(free, free)]
        np.testing.assert_allclose(L[b].numpy(), ref, atol=1e-10)


def test_block_energy_sums_to_one_and_skips_fixed_vertices():
    S = build_random_sheaf(3, n_vertices=4, n_edges=5)
    fixed = torch.as_tensor(list(range(S.vertex_slice("v0").start, S.vertex_slice("v0").stop)))
    n_free = S.C0 - fixed.numel()
    V = torch.randn(6, n_free, dtype=F64)
    E = dg.block_energy(S, fixed, V)
    assert "v0" not in E and set(E) == {"v1", "v2", "v3"}
    np.testing.assert_allclose(sum(E.values()).numpy(), np.ones(6))
    # by hand for the first vertex with free coordinates
    free = np.setdiff1d(np.arange(S.C0), fixed.numpy())
    sl = S.vertex_slice("v1")
    pos = [i for i, c in enumerate(free) if sl.start <= c < sl.stop]
    np.testing.assert_allclose(E["v1"].numpy(), (V[:, pos] ** 2).sum(1).numpy() / (V ** 2).sum(1).numpy())


def test_eigenvector_stability():
    v = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], dtype=F64)
    # pairs: |cos| = 0, 1, 0 -> mean over ordered pairs = 1/3
    assert dg.eigenvector_stability(v) == pytest.approx(1 / 3)
    assert dg.eigenvector_stability(v[:1]) == 1.0


def test_edge_names_and_grouping():
    assert [dg.edge_type(n) for n in ("weight:z1", "act:a3", "out:y", "penalty:a1.0", "e1")] == \
        ["weight", "act", "out", "penalty", "edge"]
    assert [dg.edge_layer(n) for n in ("weight:z12", "act:a3", "out:y", "penalty:a1", "e1")] == \
        ["12", "3", "y", "penalty", "e1"]
    series = {"weight:z1": torch.tensor([1.0, 2.0]), "act:a1": torch.tensor([3.0, 4.0]),
              "weight:z2": torch.tensor([5.0, 6.0])}
    assert torch.equal(dg.group_trace(series, "type")["weight"], torch.tensor([6.0, 8.0]))
    assert list(dg.group_trace(series, "layer")) == ["1", "2"]
    with pytest.raises(ValueError, match="group by"):
        dg.group_trace(series, "kind")


def _net_sheaf():
    """x(3: input 2 + ones 1) -> z1(2) -> a1(2) with a ReLU, named as the compiler names them."""
    S = cs.Sheaf()
    S.add_vertex("x", 3); S.add_vertex("z1", 2); S.add_vertex("a1", 2)
    W = torch.tensor([[1.0, -1.0, 0.5], [2.0, 0.0, -1.0]], dtype=F64)
    S.add_edge("x", "z1", W, torch.eye(2, dtype=F64), name="weight:z1")
    S.add_edge("z1", "a1", cs.maps.ReLU(2), torch.eye(2, dtype=F64), name="act:a1")
    return S, W


def test_discord_splits_and_trace_match_dense():
    S, W = _net_sheaf()
    x = torch.randn(4, S.C0, dtype=F64, generator=torch.Generator().manual_seed(0))
    d = dg.discord(S, x)
    r1 = x[:, 0:3] @ W.T - x[:, 3:5]
    r2 = torch.relu(x[:, 3:5]) - x[:, 5:7]
    torch.testing.assert_close(d["weight:z1"], 0.5 * (r1 ** 2).sum(1))
    torch.testing.assert_close(d["act:a1"], 0.5 * (r2 ** 2).sum(1))
    by = dg.discord_by(S, x, "layer")
    torch.testing.assert_close(by["1"], d["weight:z1"] + d["act:a1"])
    traj = torch.stack([x, 2 * x, 3 * x])  # (T, B, C0)
    tr = dg.discord_trace(S, traj)
    torch.testing.assert_close(tr["weight:z1"], torch.stack([d["weight:z1"].sum() * k ** 2 for k in (1, 2, 3)]))
    with pytest.raises(ValueError, match="trajectory"):
        dg.discord_trace(S, torch.zeros(3, 5))


def test_residuals_sign_convention_and_active_split():
    S, W = _net_sheaf()
    x = torch.randn(5, S.C0, dtype=F64, generator=torch.Generator().manual_seed(1))
    res = dg.residuals(S, x)
    torch.testing.assert_close(res["weight:z1"].residual, x[:, 0:3] @ W.T - x[:, 3:5])  # (W̄ a)_j − z_j
    torch.testing.assert_close(res["act:a1"].residual, torch.relu(x[:, 3:5]) - x[:, 5:7])  # ReLU(z_j) − a_j
    for r in res.values():
        torch.testing.assert_close(r.z, x[:, 3:5])  # both coloured by the pre-activation z1
    act, inact = res["act:a1"].split()
    assert act.numel() + inact.numel() == 10
    torch.testing.assert_close(inact, -x[:, 5:7][x[:, 3:5] < 0])  # inactive: ReLU(z) = 0
