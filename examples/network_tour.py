"""A network as a sheaf: compile, infer, pin, clamp, train, diagnose.

Run it with ``python examples/network_tour.py`` (``--quick`` for smaller sizes,
``--out DIR`` to also write figures). The tutorial ``docs/tutorial-networks.md``
shows these sections.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import cellsheaf_nn as csnn
from cellsheaf_nn import datasets, diagnostics
from cellsheaf_nn.train import SheafTrainer, mlp, train_sgd

QUICK = "--quick" in sys.argv
OUT = Path(sys.argv[sys.argv.index("--out") + 1]) if "--out" in sys.argv else None
torch.set_default_dtype(torch.float64)


def main() -> None:
    task = datasets.paraboloid(seed=0)
    X, Y = task.X_train, task.Y_train

    # --8<-- [start:compile]
    model = mlp([2, 12, 1], seed=0)                     # He initialisation, zero biases
    train_sgd(model, X, Y, loss="mse", steps=50 if QUICK else 1000, optimizer="adam", lr=0.01, progress=False)
    model.requires_grad_(False)                         # trained: from here on we only evaluate it
    ns = csnn.compile(model)
    print(ns)
    print("vertices:", ns.sheaf.vertices)               # x, z1, a1, z2: one per quantity (Eq. 13)
    print("edges:   ", ns.sheaf.edges)                  # weight:z1, act:a1, weight:z2 (Eqs. 15-16)
    print("stalk of a1:", ns.sheaf.dim("a1"), "= 12 neurons + 1 ones coordinate for the next bias")
    print("det δ_Ω =", ns.coboundary_determinant(X[0]))  # Lemma 3.2
    # --8<-- [end:compile]

    # --8<-- [start:infer]
    x = task.X_test[:5]
    y = ns.infer(x)                                     # propagation: exact, the forward pass (Prop. 3.4)
    print("sheaf == model:", torch.allclose(y, model(x)))
    y_heat, state = ns.infer(x, method="diffusion", return_state=True,
                             generator=torch.Generator().manual_seed(0))
    info = state.info                                   # the heat equation (18) from random stalks
    print(f"diffusion: converged={info.converged} in {info.steps} Euler steps, "
          f"max error {float((y_heat - model(x)).abs().max()):.1e}")
    # --8<-- [end:infer]

    # --8<-- [start:pin]
    x1 = x[:1]
    _, free = ns.infer(x1, return_state=True)
    j = int(free["a1"][0].argmax())                     # the most active hidden neuron
    hard = ns.pin("a1", [j], torch.tensor([0.0]))       # switch it off (a hard pin: new boundary data)
    _, pinned = ns.infer(x1, return_state=True, check=False)
    ns.unpin(hard)
    print(f"pinning a1[{j}] to 0: output {float(free['z2'][0, 0]):.4f} -> {float(pinned['z2'][0, 0]):.4f}; "
          f"upstream z1 moves by {float((pinned['z1'] - free['z1']).abs().max()):.3f}")
    soft = ns.pin("a1", [j], torch.tensor([0.0]), strength=10.0)   # a penalty edge of strength γ (Eq. 23)
    _, softly = ns.infer(x1, return_state=True, check=False)
    ns.unpin(soft)
    print(f"soft pin (γ=10): a1[{j}] = {float(softly['a1'][0, j]):.4f}, between the free value and 0")
    # --8<-- [end:pin]

    # --8<-- [start:clamp]
    # Fix the output and the first input; solve for the second input (imputation, Note 5.1).
    target = torch.tensor([[1.0]])
    freed = ns.free_input([1])
    clamp = ns.clamp(ns.output, target)
    x_guess = torch.tensor([[1.0, 0.0]])
    _, completed = ns.infer(x_guess, return_state=True, check=False)
    ns.unpin(clamp)
    ns.unpin(freed)
    x2 = float(completed["x"][0, 1])
    print(f"with x1 = 1 and the output clamped to 1, the sheaf completes x2 = {x2:.4f}; "
          f"model([1, x2]) = {float(model(torch.tensor([[1.0, x2]]))[0, 0]):.4f}")
    # --8<-- [end:clamp]

    # --8<-- [start:train]
    fresh = csnn.compile(mlp([2, 12, 1], seed=1))
    trainer = SheafTrainer(fresh, mode="joint", loss="mse", dt=0.01, seed=0)
    n = 40 if QUICK else 300
    hist = trainer.fit(X[:n], Y[:n], X_val=task.X_test, Y_val=task.Y_test, steps=30 if QUICK else 1000,
                       progress=False)
    print(f"sheaf training (joint dynamics, Eq. 26): test loss {hist.val_loss[0]:.4f} -> {hist.val_loss[-1]:.4f}")
    trained = fresh.to_module()                         # back to an ordinary torch module
    # --8<-- [end:train]

    # --8<-- [start:diagnose]
    probe = task.X_test[: 10 if QUICK else 50]
    summary = diagnostics.spectral_summary(ns, probe)   # L[Ω,Ω] at each input's activation pattern
    print(f"λ₁ median {float(summary.lambda_1.median()):.4f}, "
          f"λ_max median {float(summary.lambda_max.median()):.2f}, "
          f"Fiedler vector on {summary.dominant_block('fiedler')}")
    pinned_table = diagnostics.pinned_discord(ns, probe, task.Y_test[: len(probe)]).table()   # Table 3
    print("discord with the output pinned to the labels:",
          {k: round(m, 5) for k, (m, _) in pinned_table.items()})
    # --8<-- [end:diagnose]

    if OUT is not None:
        from cellsheaf_nn import plots

        plots.sheaf_graph(ns, path=OUT / "sheaf_graph.png")
        plots.spectral_summary(summary, path=OUT / "spectrum.png")
        plots.decision_surface(trained, task.X_test, task.Y_test, path=OUT / "surface.png")
        print(f"figures written to {OUT}/")


if __name__ == "__main__":
    main()
