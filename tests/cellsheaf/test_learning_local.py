"""`cellsheaf.learning.local_gradients`: autograd of each edge's own energy w.r.t. its own parameters."""

import pytest
import torch
import torch.nn.functional as fn

import cellsheaf as cs
from cellsheaf import maps as M

F64 = torch.float64
g = torch.Generator().manual_seed(13)


def rand(*shape):
    return torch.randn(*shape, generator=g, dtype=F64)


def test_dense_weight_matches_eq_24():
    W = torch.nn.Parameter(rand(2, 3))
    S = cs.Sheaf(); S.add_vertex("u", 3); S.add_vertex("v", 2)
    S.add_edge("u", "v", M.Linear(W, trainable=True), torch.eye(2, dtype=F64), name="e")
    x = rand(4, 5)
    (G,) = cs.learning.local_gradients(S, x)
    assert torch.allclose(G, cs.learning.map_gradients(S, x)[("e", "u")], atol=1e-12)


def test_conv_kernel_and_bias_match_the_closed_form():
    W, b = torch.nn.Parameter(rand(3, 2, 2, 2)), torch.nn.Parameter(rand(3))
    F = M.Conv2d(W, (2, 4, 4), stride=2).affine(b)
    S = cs.Sheaf(); S.add_vertex("x", F.d_in); S.add_vertex("z", F.d_out)
    S.add_edge("x", "z", F, M.Identity(F.d_out), name="conv", weight=0.5)
    x, z = rand(3, 2, 4, 4), rand(3, F.d_out)
    state = torch.cat([x.reshape(3, -1), torch.ones(3, F.d_out, dtype=F64), z], 1)
    grads = cs.learning.local_gradients(S, state, {"w": W, "b": b})
    r = z.reshape(3, 3, 2, 2) - fn.conv2d(x, W.detach(), b.detach(), stride=2)   # the edge's discrepancy
    want_w = -0.5 * torch.nn.grad.conv2d_weight(x, W.shape, r, stride=2)
    assert torch.allclose(grads["w"], want_w, atol=1e-12)
    assert torch.allclose(grads["b"], -0.5 * r.sum((0, 2, 3)), atol=1e-12)


def test_a_shared_parameter_sums_its_edges_and_other_edges_do_not_count():
    s = torch.nn.Parameter(rand(3))                       # a gate vector on two edges
    ln_w = torch.nn.Parameter(rand(3))
    S = cs.Sheaf()
    for v in "abcd":
        S.add_vertex(v, 3)
    I = M.Identity(3)
    S.add_edge("a", "b", M.Diagonal(s), I, name="e1")
    S.add_edge("b", "c", M.Diagonal(s), M.Scaled(2.0, 3), name="e2")
    S.add_edge("c", "d", M.LayerNorm((3,), 3, ln_w), I, name="e3")
    S.add_edge("a", "d", rand(3, 3), I, name="e4", potential=cs.potentials.Huber(0.3))
    x = rand(2, 12)
    got = cs.learning.local_gradients(S, x, [s, ln_w])
    xa, xb, xc, xd = x.split(3, 1)
    s0 = s.detach()
    want_s = (-(xb - s0 * xa) * xa - (2 * xc - s0 * xb) * xb).sum(0)
    assert torch.allclose(got[0], want_s, atol=1e-12)
    w = ln_w.detach().clone().requires_grad_()
    E3 = 0.5 * (xd - fn.layer_norm(xc, (3,), w)).square().sum()
    assert torch.allclose(got[1], torch.autograd.grad(E3, w)[0], atol=1e-12)


def test_potential_tensors_without_grad_and_errors():
    t = rand(2)                                            # a plain tensor: differentiated, then left as it was
    S = cs.Sheaf(); S.add_vertex("a", 2); S.add_vertex("b", 2)
    S.add_edge("a", "b", M.Diagonal(t), torch.eye(2, dtype=F64), potential=cs.potentials.Huber(0.1))
    x = rand(4)
    (G,) = cs.learning.local_gradients(S, x, [t])
    tt = t.clone().requires_grad_()
    E = cs.potentials.Huber(0.1).pair_value(x[2:], tt * x[:2]).sum()
    assert torch.allclose(G, torch.autograd.grad(E, tt)[0], atol=1e-12) and not t.requires_grad
    assert torch.equal(cs.learning.local_gradients(S, x, [rand(3)])[0], torch.zeros(3, dtype=F64))
    with pytest.raises(TypeError, match="'n' is not a floating tensor"):
        cs.learning.local_gradients(S, x, {"n": torch.ones(2, dtype=torch.long)})


def _closed_form_cases():
    W, b = rand(3, 4), rand(3)
    mask = (rand(3, 4) > 0).to(F64)
    conv = M.Conv2d(rand(3, 2, 2, 2), (2, 4, 4), stride=2)
    return {
        "linear": M.Linear(W.clone()),
        "masked linear": M.Linear(W.clone(), mask=mask),
        "affine (W | diag b)": M.Affine(W.clone(), b.clone()),
        "affine, ones block elsewhere": M.Affine(W.clone(), b.clone(), d_in=9, ones=5),
        "affine, no bias": M.Affine(W.clone()),
        "affine conv, per-channel bias": M.Affine(conv, rand(3), shape=conv.out_shape, axis=0),
        "affine tokens, broadcast bias": M.Affine(M.TokenLinear(rand(2, 2), 2), rand(2), shape=(2, 2)),
    }


@pytest.mark.parametrize("name", list(_closed_form_cases()))
def test_parameter_vjp_is_the_gradient_of_the_pairing(name):
    """A map's closed-form parameter gradient (when it declares one) equals autograd of ``⟨w, F(x)⟩``."""
    F = _closed_form_cases()[name]
    x, w = rand(5, F.d_in), rand(5, F.d_out)
    tensors = F.tensors()
    for t in tensors:
        t.requires_grad_(True)
    auto = torch.autograd.grad((w * F.apply(x)).sum(), tensors, allow_unused=True)
    got = F.parameter_vjp(x, w)
    if name.startswith("affine conv"):   # a convolution declares no closed form: autograd is the rule's fallback
        assert got is None
        return
    assert len(got) == len(tensors)
    mask = getattr(F, "mask", None)
    for g, a in zip(got, auto):
        a = a if mask is None else a * mask
        assert g.shape == a.shape and torch.allclose(g, a, atol=1e-12), name


def test_the_closed_form_and_autograd_give_the_same_local_rule():
    """`local_gradients` of a plain affine edge (closed form) equals that of the same map behind `Compose` (no
    closed form: autograd), summed with another edge that shares the weight."""
    W, b = torch.nn.Parameter(rand(3, 4)), torch.nn.Parameter(rand(3))
    F = M.Affine(W, b)
    S = cs.Sheaf(); S.add_vertex("u", 7); S.add_vertex("v", 3); S.add_vertex("w", 3)
    S.add_edge("u", "v", F, M.Identity(3), name="plain")
    S.add_edge("u", "w", M.Compose(M.Identity(3), F), M.Scaled(0.5, 3), name="wrapped", weight=2.0)
    x = rand(6, 13)
    got = cs.learning.local_gradients(S, x, {"W": W, "b": b})
    Wd, bd = W.detach(), b.detach()
    xu, xv, xw = x[:, :4], x[:, 7:10], x[:, 10:13]
    r1 = xv - (xu @ Wd.T + bd * x[:, 4:7])
    r2 = 0.5 * xw - (xu @ Wd.T + bd * x[:, 4:7])
    assert torch.allclose(got["W"], -(r1.T @ xu) - 2 * (r2.T @ xu), atol=1e-12)
    assert torch.allclose(got["b"], -(r1 * x[:, 4:7]).sum(0) - 2 * (r2 * x[:, 4:7]).sum(0), atol=1e-12)
