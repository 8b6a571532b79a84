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


@settings(max_examples=10, deadline=None)
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


def test_restricted_laplacians_in_chunks_equal_one_pass(monkeypatch):
    S = build_random_sheaf(5, n_vertices=5, n_edges=7, maps="nonlinear")
    at = torch.randn(7, S.C0, dtype=F64, generator=torch.Generator().manual_seed(5))
    fixed = torch.tensor([0, 3])
    whole = dg.restricted_laplacians(S, fixed, at)
    monkeypatch.setattr(dg, "_CHUNK", 1)  # one input per pass
    torch.testing.assert_close(dg.restricted_laplacians(S, fixed, at), whole)


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


# ---------------------------------------------------------------------------- compiled networks


def _mlp(sizes, seed=0, output="identity"):
    from cellsheaf_nn.train import mlp

    return mlp(sizes, output=output, seed=seed)


def _inputs(n, seed=0):
    return torch.randn(n, 2, dtype=F64, generator=torch.Generator().manual_seed(seed))


def test_spectrum_matches_hand_built_laplacian_of_one_hidden_layer():
    """L[Ω,Ω] = δ_Ωᵀδ_Ω with δ_Ω built by hand from W2 and the ReLU pattern (Lemma 3.2 block structure)."""
    import cellsheaf_nn as csnn

    model = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1)).double()
    ns = csnn.compile(model)
    X = _inputs(6, 1)
    lam = dg.spectrum(ns, X)
    W2 = model[2].weight.detach().numpy()
    z1 = model[0](X).detach().numpy()
    for b in range(len(X)):
        R = np.diag((z1[b] >= 0).astype(float))
        # columns: z1 (4), a1 neural block (4), z2 (1); rows: weight:z1, act:a1, weight:z2
        D = np.block([[np.eye(4), np.zeros((4, 4)), np.zeros((4, 1))],
                      [-R, np.eye(4), np.zeros((4, 1))],
                      [np.zeros((1, 4)), -W2, np.eye(1)]])
        np.testing.assert_allclose(lam[b].numpy(), np.linalg.eigvalsh(D.T @ D), atol=1e-10)
        np.testing.assert_allclose(lam[b].numpy(), torch.linalg.eigvalsh(ns.restricted_laplacian(X[b])).numpy(),
                                   atol=1e-10)


def test_spectrum_with_sigmoid_output_and_soft_pin_matches_per_input_operator():
    import cellsheaf_nn as csnn

    ns = csnn.compile(_mlp([2, 5, 3, 1], seed=3, output="sigmoid"))
    pin = ns.pin("a1", [1], torch.tensor([0.5], dtype=F64), strength=4.0)
    X = _inputs(4, 2)
    lam = dg.spectrum(ns, X)
    assert lam.shape == (4, ns.pinned_sheaf.C0 - ns.boundary(X).resolve(ns.pinned_sheaf).fixed.numel())
    for b in range(4):
        ref = torch.linalg.eigvalsh(ns.restricted_laplacian(X[b]))
        torch.testing.assert_close(lam[b], ref, atol=1e-10, rtol=0)
    ns.unpin(pin)
    with pytest.raises(ValueError, match=r"shape \(B, 2\)"):
        dg.spectrum(ns, torch.zeros(3, 5, dtype=F64))


def test_spectral_summary_statistics_and_eigenvectors():
    import cellsheaf_nn as csnn

    ns = csnn.compile(_mlp([2, 6, 4, 1], seed=1))
    X = _inputs(10, 3)
    s = dg.spectral_summary(ns, X)
    lam, V = dg.eigenpairs(ns, X)
    torch.testing.assert_close(s.lambda_1, lam[:, 0])
    torch.testing.assert_close(s.condition, lam[:, -1] / lam[:, 0])
    L = dg._laplacians(ns, X)
    torch.testing.assert_close(L @ V[..., :1], lam[:, None, :1] * V[..., :1])  # A v = λ v for the Fiedler pair
    fied = s.block_energy["fiedler"]
    assert set(fied) == {"z1", "a1", "z2", "a2", "z3"}  # the input vertex has no free coordinate
    torch.testing.assert_close(sum(fied.values()), torch.ones(10, dtype=F64))
    d = s.as_dict()
    assert d["lambda_1"]["median"] == pytest.approx(float(torch.quantile(lam[:, 0], 0.5)))
    assert 0 < d["fiedler_stability"] <= 1 and d["n_free"] == lam.shape[1]


def test_paper_table_2_gap_falls_with_depth_and_fiedler_on_output_preactivation():
    """He init, zero biases, 50 random inputs: median λ₁ falls with depth (paper: 0.2248, 0.0602, 0.0281)."""
    import cellsheaf_nn as csnn

    paper = {(2, 30, 1): 0.2248, (2, 10, 8, 1): 0.0602, (2, 8, 6, 4, 1): 0.0281}
    seeds = range(4)
    medians = {}
    for sizes in paper:
        runs = [dg.spectral_summary(csnn.compile(_mlp(list(sizes), seed=s)), _inputs(50, 100 + s)) for s in seeds]
        medians[sizes] = float(np.mean([float(r.lambda_1.median()) for r in runs]))
        if sizes == (2, 30, 1):
            assert all(r.dominant_block("fiedler") == "z2" for r in runs)
            assert np.mean([float(r.block_energy["fiedler"]["z2"].mean()) for r in runs]) > 0.5
    m = list(medians.values())
    assert m[0] > 2 * m[1] > 0 and m[1] > 1.2 * m[2] > 0
    for sizes, ref in paper.items():
        assert ref / 2.5 < medians[sizes] < ref * 2.5, (sizes, medians[sizes], ref)


def test_spectral_tracker_records_quartiles():
    import cellsheaf_nn as csnn

    ns = csnn.compile(_mlp([2, 4, 1], seed=0))
    X = _inputs(7)
    tr = dg.SpectralTracker(X)
    tr.record(0, ns, loss=1.0)
    with torch.no_grad():
        ns.sheaf.edge("weight:z2").Fu.A.weight.mul_(3.0)
    ns.sheaf._touch()
    tr.record(5, ns, loss=0.5)
    st = tr.stats
    assert tr.steps == [0, 5] and tr.loss == [1.0, 0.5] and st["lambda_max"].shape == (2, 3)
    assert (np.diff(st["lambda_1"], axis=1) >= 0).all()  # q25 <= median <= q75
    assert st["lambda_max"][1, 1] > st["lambda_max"][0, 1]  # larger weights, larger λ_max
    ref = torch.quantile(dg.spectrum(ns, X)[:, 0], 0.5)
    assert st["lambda_1"][1, 1] == pytest.approx(float(ref))


def test_spectral_tracker_as_training_callback():
    import cellsheaf_nn as csnn
    from cellsheaf_nn.train import SheafTrainer, train_sgd

    task = csnn.datasets.paraboloid(seed=0)
    X, Y = task.X_train[:40], task.Y_train[:40]
    model = _mlp([2, 5, 1], seed=0)
    sgd = dg.SpectralTracker(task.X_test[:10])
    hist = train_sgd(model, X, Y, steps=6, eval_every=3, progress=False, callbacks=[sgd])
    assert hist.step == [0, 3, 6] and sgd.steps == [3, 6]  # called at every evaluation after the first
    assert sgd.loss == pytest.approx(hist.train_loss[1:])
    assert sgd.stats["lambda_1"][-1, 1] == pytest.approx(
        float(torch.quantile(dg.spectrum(csnn.compile(model), task.X_test[:10])[:, 0], 0.5)))
    ns = csnn.compile(_mlp([2, 5, 1], seed=1))
    local = dg.SpectralTracker(task.X_test[:10])
    SheafTrainer(ns, mode="joint", dt=0.01).fit(X, Y, steps=4, eval_every=2, progress=False, callbacks=[local])
    assert local.steps == [2, 4]
    assert len(local.lambda_1_values) == len(local.steps) and local.lambda_1_values[0].shape == (10,)


def test_network_discord_by_layer_uses_layout_and_forward_pass_is_consistent():
    import cellsheaf_nn as csnn

    ns = csnn.compile(_mlp([2, 5, 3, 1], seed=2, output="sigmoid"))
    X = _inputs(6)
    _, st = ns.infer(X, return_state=True)
    by_type = dg.discord_by(ns, st.cochain, "type")
    assert list(by_type) == ["weight", "act", "out"]
    assert max(float(v.max()) for v in by_type.values()) < 1e-20  # a global section: no discord anywhere
    x = st.cochain.flat + 0.1 * torch.randn_like(st.cochain.flat)
    per_edge = dg.discord(ns, x)
    by_layer = dg.discord_by(ns, x, "layer")
    assert list(by_layer) == ["1", "2", "3"]  # out:y belongs to the last Linear layer's group
    torch.testing.assert_close(by_layer["3"], per_edge["weight:z3"] + per_edge["out:y"])
    torch.testing.assert_close(sum(by_layer.values()), cs.energy(ns.sheaf, x))


def test_diffusion_path_reaches_forward_pass_and_trace_decreases():
    import cellsheaf_nn as csnn

    model = _mlp([2, 4, 1], seed=0)
    ns = csnn.compile(model)
    X = _inputs(3)
    t, path = dg.diffusion_path(ns, X, steps=3000, every=300, generator=torch.Generator().manual_seed(0))
    assert path.shape == (11, 3, ns.sheaf.C0) and t[0] == 0 and t[-1] > t[1]
    out = path[-1][:, ns.coords(ns.output)]
    torch.testing.assert_close(out, model(X).detach(), atol=1e-6, rtol=0)
    total = sum(dg.discord_trace(ns, path).values())
    assert (total[1:] <= total[:-1] + 1e-12).all()  # discord decreases monotonically (Thm 4.1)
    _, st = ns.infer(X, method="diffusion", record=50, return_state=True, generator=torch.Generator().manual_seed(1))
    rec = dg.discord_trace(ns, st.info)
    assert set(rec) == set(ns.sheaf.edges) and float(sum(rec.values())[-1]) < 1e-15


def test_pinned_discord_table_3():
    import cellsheaf_nn as csnn

    model = _mlp([2, 6, 1], seed=1)
    ns = csnn.compile(model)
    X = _inputs(12, 4)
    Y = model(X).detach()
    zero = dg.pinned_discord(ns, X, Y)
    assert zero.converged and zero.table()["total"][0] < 1e-20 and not ns.pins  # nothing to absorb; clamp removed
    pd = dg.pinned_discord(ns, X, Y + 0.3)
    table = pd.table()
    assert set(table) == {"weight:z1", "act:a1", "weight:z2", "total"}
    assert table["total"][0] == pytest.approx(sum(m for k, (m, _) in table.items() if k != "total"))
    assert table["total"][0] > 1e-4
    # Newton and the paper's gradient flow settle at the same energy, also on a switching surface (Note 5.1)
    flow = dg.pinned_discord(ns, X[:4], Y[:4] + 0.3, method="euler", max_steps=4000)
    torch.testing.assert_close(flow.total, pd.total[:4], atol=1e-3, rtol=1e-3)
    # input 0 converges: the clamped state is the harmonic extension of the sheaf frozen at its own pattern
    pin = ns.clamp(ns.output, Y[:1] + 0.3)
    _, st = ns.infer(X[:1], return_state=True)
    b = ns.boundary(X[:1])
    ns.unpin(pin)
    ref = cs.harmonic_extension(ns.sheaf.linearize(st.cochain.flat[0]), b)
    torch.testing.assert_close(st.cochain.flat, ref.flat, atol=1e-9, rtol=0)
    assert pd.converged and pd.on_kinks >= 1 and zero.on_kinks == 0  # some inputs end on a kink (Note 5.1)
    with pytest.raises(ValueError, match=r"labels must have shape \(B, 1\)"):
        dg.pinned_discord(ns, X, torch.zeros(12, 2, dtype=F64))


def test_report_mentions_gap_and_pinned_discord():
    import cellsheaf_nn as csnn

    model = _mlp([2, 5, 1], seed=0)
    ns = csnn.compile(model)
    X = _inputs(10)
    text = dg.report(ns, X, model(X).detach() + 0.1)
    assert "lambda_1" in text and "Fiedler vector lives on z2" in text and "total" in text


def test_float32_networks_agree_with_float64():
    import cellsheaf_nn as csnn

    X = _inputs(6, 5)
    ns32 = csnn.compile(csnn.mlp([2, 6, 3, 1], seed=0, dtype=torch.float32))
    ns64 = csnn.compile(csnn.mlp([2, 6, 3, 1], seed=0))
    lam32 = dg.spectrum(ns32, X.float())
    assert lam32.dtype == torch.float32
    torch.testing.assert_close(lam32.double(), dg.spectrum(ns64, X), atol=1e-5, rtol=1e-4)
    Y = ns64.infer(X) + 0.1
    t32 = dg.pinned_discord(ns32, X.float(), Y.float()).table()["total"][0]
    t64 = dg.pinned_discord(ns64, X, Y).table()["total"][0]
    assert t32 == pytest.approx(t64, rel=1e-3)
