"""Spec round trip of a map inside a one-edge sheaf (through JSON)."""

import torch

import cellsheaf as cs


def check_round_trip(F):
    S = cs.Sheaf(); S.add_vertex("a", F.d_in); S.add_vertex("b", F.d_out)
    S.add_edge("a", "b", F, cs.maps.Identity(F.d_out), name="e")
    T = cs.Sheaf.from_spec(S.to_spec().model_dump_json())
    assert T == S
    G = T.edge("e").Fu
    assert type(G) is type(F)
    x = torch.randn(2, F.d_in, dtype=torch.float64)
    assert torch.equal(G.apply(x), F.apply(x))
