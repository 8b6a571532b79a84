"""A network as a sheaf: compile, infer, pin, clamp, train, diagnose.

Run it with ``python examples/network_tour.py``: it prints what it finds and
writes three figures to ``figures/`` (matplotlib needed). The tutorial
``docs/tutorial-networks.md`` shows every line of it, section by section.
"""

# --8<-- [start:setup]
import torch

import cellsheaf_nn as csnn
from cellsheaf_nn import datasets, diagnostics
from cellsheaf_nn.train import SheafTrainer, mlp, train_sgd

torch.set_default_dtype(torch.float64)
task = datasets.paraboloid(seed=0)          # the paper's regression task (Sec. 6.2): 300 training points
X, Y = task.X_train, task.Y_train
# --8<-- [end:setup]

# --8<-- [start:compile]
model = mlp([2, 12, 1], seed=0)                     # He initialisation, zero biases
train_sgd(model, X, Y, loss="mse", steps=1000, optimizer="adam", lr=0.01, progress=False)
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
_, pinned = ns.infer(x1, return_state=True)         # Newton from the forward pass
print(pinned.info)                                  # the solver's report: converged, iterations, residual
ns.unpin(hard)                                      # remove the pin: the network is as before
print(f"pinning a1[{j}] to 0: output {float(free['z2'][0, 0]):.4f} -> {float(pinned['z2'][0, 0]):.4f}; "
      f"upstream z1 moves by {float((pinned['z1'] - free['z1']).abs().max()):.3f}")
soft = ns.pin("a1", [j], torch.tensor([0.0]), strength=10.0)   # a penalty edge of strength γ (Eq. 23)
_, softly = ns.infer(x1, return_state=True)
ns.unpin(soft)
print(f"soft pin (γ=10): a1[{j}] = {float(softly['a1'][0, j]):.4f}, between the free value and 0")
# --8<-- [end:pin]

# --8<-- [start:clamp]
# Fix the output and the first input; solve for the second input (imputation, Note 5.1).
target = torch.tensor([[1.0]])
freed = ns.free_input([1])                          # x[1] is solved for; x_guess[1] is only a start
clamp = ns.clamp(ns.output, target)
x_guess = torch.tensor([[1.0, 0.0]])
_, completed = ns.infer(x_guess, return_state=True)
ns.unpin(clamp)
ns.unpin(freed)                                     # one undo for every handle: x[1] is fixed to x again
x2 = float(completed["x"][0, 1])
print(f"with x1 = 1 and the output clamped to 1, the sheaf completes x2 = {x2:.4f}; "
      f"model([1, x2]) = {float(model(torch.tensor([[1.0, x2]]))[0, 0]):.4f}")
# --8<-- [end:clamp]

# --8<-- [start:train]
fresh = csnn.compile(mlp([2, 12, 1], seed=1))
trainer = SheafTrainer(fresh, mode="nudged", loss="mse", optimizer="adam", lr=0.02, seed=0)
hist = trainer.fit(X, Y, X_val=task.X_test, Y_val=task.Y_test, steps=300, progress=False)
print(f"local training (nudged, Adam): test loss {hist.val_loss[0]:.4f} -> {hist.val_loss[-1]:.4f}")
trained = fresh.to_module()                         # back to an ordinary torch module
# --8<-- [end:train]

# --8<-- [start:joint]
paper = csnn.compile(mlp([2, 12, 1], seed=1))
joint = SheafTrainer(paper, mode="joint", loss="mse", dt=0.01, seed=0)
hist = joint.fit(X, Y, X_val=task.X_test, Y_val=task.Y_test, steps=1000, progress=False)
print(f"joint dynamics (Eq. 26), 1000 Euler steps: test loss {hist.val_loss[0]:.4f} -> {hist.val_loss[-1]:.4f}")
# --8<-- [end:joint]

# --8<-- [start:diagnose]
probe = task.X_test[:50]
summary = diagnostics.spectral_summary(ns, probe)   # L[Ω,Ω] at each input's activation pattern
print(f"λ₁ median {float(summary.lambda_1.median()):.4f}, "
      f"λ_max median {float(summary.lambda_max.median()):.2f}, "
      f"Fiedler vector on {summary.dominant_block('fiedler')}")
pinned_table = diagnostics.pinned_discord(ns, probe, task.Y_test[: len(probe)]).table()   # Table 3
print("discord with the output pinned to the labels:",
      {k: round(m, 5) for k, (m, _) in pinned_table.items()})
# --8<-- [end:diagnose]

# --8<-- [start:figures]
from cellsheaf_nn import plots                      # needs matplotlib: pip install "cellsheaf[plot]"

plots.sheaf_graph(ns, path="figures/sheaf_graph.png")           # Figs. 1-2
plots.spectral_summary(summary, path="figures/spectrum.png")    # Fig. 15
plots.decision_surface(trained, task.X_test, task.Y_test, path="figures/surface.png")   # Fig. 7
print("figures written to figures/")
# --8<-- [end:figures]
