"""Training benchmark: the paper's Table 1 (Sec. 6.2, App. C.2), our fast local modes, digits, β·M collapse.

One command runs everything and writes a markdown table and JSON under ``benchmarks/results/``::

    python benchmarks/bench_train.py            # the paper's step counts (about 50 minutes on one core)
    python benchmarks/bench_train.py --quick    # the joint runs shortened 20×
    python benchmarks/bench_train.py --speed    # only the cost of one update against a backprop step
    python benchmarks/bench_train.py --cnn      # only a small CNN on digits images: nudged vs backprop

``--speed``: milliseconds per update of the modes ``nudged``, ``equilibrium`` (both
Adam) and ``joint`` (the paper's Euler step) against one backprop step (forward,
backward, optimizer step) of the same model on the same batch: digits [64, 64, 10]
at B = 256 (Adam) and the paraboloid 1H at B = 300 (Adam for the local modes, SGD
for the joint step, whose update is plain gradient descent); plus the diffusion
inference step on [2, 10, 8, 1] at B = 256 against a forward and backward pass (200 Euler steps
per timed run at the default step size, computed once beforehand: its per-item λ_max search is setup,
not a step).
Medians of per-pair ratios of interleaved runs in one process, timed in thread CPU time
(robust to a loaded machine). Targets: nudged
≤ 2×, equilibrium ≤ 5×, joint ≤ 1×, diffusion ≤ 1×.

``--cnn``: a small CNN (Conv2d 1→8, ReLU, MaxPool2d, Conv2d 8→16, ReLU, MaxPool2d,
Linear 64→10 logits, cross-entropy; ``--pool avg`` for AvgPool2d) on scikit-learn's digits as 1×8×8 images,
trained from the same initialisation by the nudged mode and by backprop with the
same optimizer (Adam, lr 0.01), minibatches (128, the same order) and number of
steps (600): test accuracy of both and their difference (target: within 0.5 points). The nudged
trainer uses its default local rule (``free_stalks=True``: the free state's stalks).

For each of the 8 task × depth configurations, every method starting from the
same He-initialised network: SGD (full batch, the paper's learning rates,
10⁵ / 2·10⁵ updates — the joint run's count at the paper's settings), the
paper's joint dynamics (``mode="joint"``: α = 1, β = 1/300, dt = 0.005 (1H) /
0.01 (2H)), and the local modes ``"nudged"`` and ``"equilibrium"`` driven by
Adam, each stopped once its wall time reaches ``--budget`` (default 1/10) of the
joint run's. With ``--quick`` the joint run takes 1/20 of the paper's steps and
its full-length wall time is projected ×20 (every Euler step costs the same);
SGD still runs the paper's full count. Ratios: test loss over SGD's, wall time
over the (full) joint run's, measured in this process. Then scikit-learn's
digits with the nudged mode and with SGD (both Adam, minibatches), and the
β·M collapse of Fig. 8a (final loss of the joint dynamics against β·M).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

import cellsheaf_nn as csnn
from cellsheaf_nn import datasets, losses
from cellsheaf_nn.train import check_inputs

RESULTS = Path(__file__).resolve().parent / "results"
TASKS = ("paraboloid", "saddle", "circular", "blobs")
DEPTHS = ("1H", "2H")
JOINT_DT = {"1H": 0.005, "2H": 0.01}
JOINT_STEPS = {"1H": 100_000, "2H": 200_000}
QUICK_FACTOR = 20
LOCAL = ("nudged", "equilibrium")
# the paper's Table 1 (App. C.2): test loss of its sheaf (joint) run, of its SGD run, and their ratio
PAPER_TABLE1 = {("paraboloid", "1H"): (0.0884, 0.0044, 19.9), ("saddle", "1H"): (0.0106, 0.0013, 8.4),
                ("circular", "1H"): (0.0679, 0.0031, 22.0), ("blobs", "1H"): (0.1212, 0.2613, 0.5),
                ("paraboloid", "2H"): (0.0880, 0.0095, 9.2), ("saddle", "2H"): (0.0126, 0.0011, 11.0),
                ("circular", "2H"): (0.0188, 0.0003, 58.7), ("blobs", "2H"): (0.1323, 0.6758, 0.2)}


def _evaluate(forward, task, loss) -> dict:
    with torch.no_grad():
        out_tr, out_te = forward(task.X_train), forward(task.X_test)
    row = {"train_loss": float(loss(out_tr, task.Y_train)), "test_loss": float(loss(out_te, task.Y_test))}
    row["test_acc"] = losses.accuracy(out_te, task.Y_test) if task.classification else None
    return row


def run_sgd(task, depth: str, steps: int, seed: int, **kw) -> dict:
    model = csnn.mlp(task.sizes(depth), output=task.output, seed=seed)
    t0 = time.perf_counter()
    csnn.train_sgd(model, task.X_train, task.Y_train, loss=task.loss, steps=steps, progress=False,
                   eval_every=steps, **kw)
    wall = time.perf_counter() - t0
    return dict(_evaluate(model, task, losses.get(task.loss)), wall=wall, steps=steps)


def run_sheaf(task, depth: str, mode: str, steps: int, seed: int, budget: float | None = None, **kw) -> dict:
    """Train a fresh copy of the initial network by a sheaf mode; with ``budget`` (seconds), stop once
    the wall time exceeds it (checked every 10 updates), at most ``steps`` updates."""
    ns = csnn.compile(csnn.mlp(task.sizes(depth), output=task.output, seed=seed))
    trainer = csnn.SheafTrainer(ns, mode=mode, loss=task.loss, seed=seed, **kw)
    t0 = time.perf_counter()
    # stop when the next 10 updates would overrun the budget, less a 3 % margin for the last updates' jitter
    stop = [] if budget is None else \
        [lambda step, hist, tr: (time.perf_counter() - t0) * (step + 10) / step > 0.97 * budget]
    try:
        trainer.fit(task.X_train, task.Y_train, steps=steps, progress=False,
                    eval_every=steps if budget is None else 10, callbacks=stop)
    except FloatingPointError as err:  # a divergent run is a result too: report it and go on
        return dict(train_loss=math.inf, test_loss=math.inf, test_acc=None, wall=time.perf_counter() - t0,
                    steps=trainer.step, diverged=str(err))
    wall = time.perf_counter() - t0
    return dict(_evaluate(ns.infer, task, losses.get(task.loss)), wall=wall, steps=trainer.step)


def local_settings(task, quick: bool) -> dict:
    """Adam rates and step caps of the fast local modes (each also stops at its time budget)."""
    lr = 0.02
    return {"nudged": dict(steps=100_000, optimizer="adam", lr=lr),
            "equilibrium": dict(steps=100_000, optimizer="adam", lr=lr, init="forward_pass")}


def table1(quick: bool, seed: int, tasks, depths, budget: float) -> Iterator[list[dict]]:
    """The rows of each task × depth configuration, one configuration at a time."""
    for name in tasks:
        task = datasets.load(name, seed=seed)
        for depth in depths:
            full = JOINT_STEPS[depth]
            steps = full // QUICK_FACTOR if quick else full
            init = "forward_pass" if task.classification else "random"
            runs = {"sgd": run_sgd(task, depth, full, seed),
                    "joint": run_sheaf(task, depth, "joint", steps, seed, alpha=1.0, beta=1 / 300,
                                       dt=JOINT_DT[depth], init=init)}
            # the joint run's wall time at the paper's step count (measured, or projected: Euler steps cost alike)
            joint_wall = runs["joint"]["wall"] * full / max(runs["joint"]["steps"], 1)
            for mode, cfg in local_settings(task, quick).items():
                runs[mode] = run_sheaf(task, depth, mode, seed=seed, budget=budget * joint_wall, **cfg)
            for method, r in runs.items():
                r.update(task=name, depth=depth, method=method, ratio_sgd=r["test_loss"] / runs["sgd"]["test_loss"],
                         time_vs_joint=r["wall"] / joint_wall)
                print(f"{name:10s} {depth} {method:11s} steps={r['steps']:>7d} train={r['train_loss']:.4g} "
                      f"test={r['test_loss']:.4g} ratio={r['ratio_sgd']:.2f}x wall={r['wall']:.1f}s "
                      f"({r['time_vs_joint']:.3f} of the full joint run) {r.get('diverged', '')}", flush=True)
            yield list(runs.values())


def digits(quick: bool, seed: int) -> list[dict]:
    task = datasets.digits(seed=seed)
    steps = 150 if quick else 600
    rows = [dict(run_sgd(task, "1H", steps, seed, optimizer="adam", lr=0.01, batch_size=256), method="sgd (adam)"),
            dict(run_sheaf(task, "1H", "nudged", steps, seed, optimizer="adam", lr=0.01, batch_size=256),
                 method="nudged (adam)")]
    for r in rows:
        r.update(task="digits", depth="1H")
        print(f"digits     1H {r['method']:11s} steps={r['steps']:>7d} test_acc={r['test_acc']:.4f} "
              f"wall={r['wall']:.1f}s", flush=True)
    return rows


def collapse(quick: bool, seed: int) -> list[dict]:
    """Fig. 8a: final training loss of the joint dynamics against β·M on the paraboloid (1H)."""
    steps = 2_000 if quick else 20_000
    rows = []
    for M in (75, 150, 300):
        task = datasets.paraboloid(seed=seed, n_train=M)
        for bm in (0.05, 0.2, 1.0, 4.0):
            ns = csnn.compile(csnn.mlp(task.sizes("1H"), seed=seed))
            trainer = csnn.SheafTrainer(ns, mode="joint", loss="mse", alpha=1.0, beta=bm / M, dt=0.005,
                                        init="random", seed=seed)
            try:
                trainer.fit(task.X_train, task.Y_train, steps=steps, progress=False, eval_every=steps)
                final = trainer.history.train_loss[-1]
            except FloatingPointError:
                final = float("inf")
            rows.append(dict(M=M, beta=bm / M, beta_M=bm, steps=steps, train_loss=final))
            print(f"collapse M={M:3d} beta*M={bm:<5} loss={final:.4g}", flush=True)
    return rows


def small_cnn(seed: int, pool: str = "max") -> torch.nn.Module:
    """The ``--cnn`` model: two convolutions with ReLU and max (or average) pooling, a Linear head (logits)."""
    from torch import nn
    torch.manual_seed(seed)
    P = nn.MaxPool2d if pool == "max" else nn.AvgPool2d
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), P(2),
                         nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), P(2),
                         nn.Flatten(), nn.Linear(64, 10)).double()


def cnn_digits(seed: int, steps: int = 600, batch_size: int = 128, lr: float = 0.01, pool: str = "max") -> dict:
    """Nudged training of `small_cnn` on digits images against backprop (see the module notes)."""
    task = datasets.digits(seed=seed)
    X, X_test = task.X_train.reshape(-1, 1, 8, 8), task.X_test.reshape(-1, 1, 8, 8)
    model = small_cnn(seed, pool)
    ns = csnn.compile(model, input_shape=(1, 8, 8))
    t0 = time.thread_time()
    csnn.train_sgd(model, X, task.Y_train, loss="ce", optimizer="adam", lr=lr, steps=steps, batch_size=batch_size,
                   seed=seed, progress=False, eval_every=steps)
    t1 = time.thread_time()
    trainer = csnn.SheafTrainer(ns, mode="nudged", loss="ce", optimizer="adam", lr=lr, batch_size=batch_size,
                                seed=seed)
    trainer.fit(X, task.Y_train, steps=steps, progress=False, eval_every=steps)
    t2 = time.thread_time()
    with torch.no_grad():
        backprop, nudged = losses.accuracy(model(X_test), task.Y_test), losses.accuracy(ns.infer(X_test), task.Y_test)
    row = dict(pool=pool, steps=steps, batch_size=batch_size, backprop_acc=backprop, nudged_acc=nudged,
               difference_points=100 * (nudged - backprop), backprop_s=t1 - t0, nudged_s=t2 - t1)
    print(f"digits CNN (1x8x8, {pool} pooling), {steps} Adam steps of {batch_size}: backprop test acc {backprop:.4f} "
          f"({t1 - t0:.1f} s), nudged {nudged:.4f} ({t2 - t1:.1f} s), difference {row['difference_points']:+.2f} "
          f"points — target within 0.5: {'met' if abs(row['difference_points']) <= 0.5 else 'NOT met'}", flush=True)
    return row


def _paired(base, f, reps: int) -> tuple[float, float, float]:
    """Median times of ``base`` and ``f`` (ms) and the median per-pair ratio of interleaved runs."""
    base(), f()
    tb, tf, ratio = [], [], []
    for _ in range(reps):
        t0 = time.thread_time(); base(); t1 = time.thread_time(); f(); t2 = time.thread_time()
        tb.append(t1 - t0); tf.append(t2 - t1); ratio.append((t2 - t1) / (t1 - t0))
    med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    return med(tb) * 1e3, med(tf) * 1e3, med(ratio)


def _backprop_step(task, depth: str, seed: int, optimizer: str, lr: float, X, Y):
    """One forward + backward + optimizer step of the torch model on ``(X, Y)``, as a closure."""
    model = csnn.mlp(task.sizes(depth), output=task.output, seed=seed)
    loss = losses.get(task.loss)
    Yt = loss.target(Y, task.sizes(depth)[-1], torch.float64)
    opt = csnn.make_optimizer(optimizer, model.parameters(), lr)

    def step():
        opt.zero_grad(set_to_none=True)
        loss(model(X), Yt).backward()
        opt.step()
    return step


def _sheaf_update(task, depth: str, mode: str, seed: int, X, Y, **kw):
    """One update of a sheaf training mode on ``(X, Y)`` (after a first one that sets up its stalks)."""
    ns = csnn.compile(csnn.mlp(task.sizes(depth), output=task.output, seed=seed))
    trainer = csnn.SheafTrainer(ns, mode=mode, loss=task.loss, seed=seed, **kw)
    trainer.fit(X, Y, steps=1, progress=False, eval_every=1)
    Xs = check_inputs(ns, X, Y, trainer.loss)[0]   # the trainer's inputs: a tuple, one tensor per input
    Yt = trainer.loss.target(Y, ns.n_out, ns.dtype)
    return lambda: trainer._update(Xs, Yt, None)


def speed(reps: int, seed: int) -> list[dict]:
    """Milliseconds per update of each sheaf mode against a backprop step (see the module notes)."""
    rows = []
    digits_task = datasets.digits(seed=seed)
    para = datasets.paraboloid(seed=seed)
    cases = [(digits_task, 256, "nudged", "adam", dict(optimizer="adam", lr=0.01)),
             (digits_task, 256, "equilibrium", "adam", dict(optimizer="adam", lr=0.01, init="forward_pass")),
             (para, 300, "nudged", "adam", dict(optimizer="adam", lr=0.02)),
             (para, 300, "equilibrium", "adam", dict(optimizer="adam", lr=0.02, init="forward_pass")),
             (para, 300, "joint", "sgd", dict(alpha=1.0, beta=1 / 300, dt=0.005))]
    for task, B, mode, opt, kw in cases:
        X, Y = task.X_train[:B], task.Y_train[:B]
        base = _backprop_step(task, "1H", seed, opt, kw.get("lr", 0.005), X, Y)
        update = _sheaf_update(task, "1H", mode, seed, X, Y, **kw)
        tb, tm, r = _paired(base, update, reps)
        name = "digits [64, 64, 10]" if task is digits_task else "paraboloid 1H"
        rows.append(dict(case=f"{name}, B={B}", mode=mode, baseline=f"backprop step ({opt})", base_ms=tb,
                         mode_ms=tm, ratio=r))
    model = csnn.mlp([2, 10, 8, 1], seed=seed)
    ns = csnn.compile(model)
    x = torch.randn(256, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    n = 200  # Euler steps per timed run: the setup (boundary, start) is shared by all of them
    # the default step 1/(α λ_max) over the batch, computed once: its setup is not a step
    _, state = ns.infer(x, method="diffusion", max_steps=1, tol=0.0, check=False, return_state=True)
    dt = state.info.t

    def fwd_bwd():
        model.zero_grad(set_to_none=True)
        model(x).sum().backward()

    def diffusion():
        ns.infer(x, method="diffusion", dt=dt, max_steps=n, tol=0.0, check=False,
                 generator=torch.Generator().manual_seed(0))
    tb, tm, r = _paired(fwd_bwd, diffusion, max(5, reps // 5))
    rows.append(dict(case="[2, 10, 8, 1], B=256", mode="diffusion step", baseline="forward + backward",
                     base_ms=tb, mode_ms=tm / n, ratio=r / n))
    for row in rows:
        print(f"{row['case']:28s} {row['mode']:15s} {row['mode_ms']:8.3f} ms   {row['baseline']:22s} "
              f"{row['base_ms']:7.3f} ms   ratio {row['ratio']:6.2f}x", flush=True)
    return rows


def _fmt(v, spec=".4g") -> str:
    return "—" if v is None else format(v, spec)


def markdown(results: dict) -> str:
    out = [f"Command: `{results['command']}` ({results['machine']}, torch {results['torch']}, "
           f"{results['threads']} thread(s), float64).", ""]
    out += ["| task | depth | method | updates | train loss | test loss | test acc | wall (s) | test / SGD | "
            "time / full joint |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["table1"]:
        out.append(f"| {r['task']} | {r['depth']} | {r['method']} | {r['steps']} | {_fmt(r['train_loss'])} | "
                   f"{_fmt(r['test_loss'])} | {_fmt(r['test_acc'], '.3f')} | {r['wall']:.1f} | "
                   f"{r['ratio_sgd']:.2f}× | {r['time_vs_joint']:.3f} |")
    out += [f"- {r['task']} {r['depth']} {r['method']}: {r['diverged']}" for r in results["table1"] if "diverged" in r]
    if not results["quick"]:
        out += ["", *paper_comparison(results["table1"])]
    if results.get("digits"):
        out += ["", "| digits | method | updates | test loss | test acc | wall (s) |", "|---|---|---|---|---|---|"]
        for r in results["digits"]:
            out.append(f"| 1H | {r['method']} | {r['steps']} | {_fmt(r['test_loss'])} | {r['test_acc']:.4f} | "
                       f"{r['wall']:.1f} |")
    if results.get("collapse"):
        Ms = sorted({r["M"] for r in results["collapse"]})
        bms = sorted({r["beta_M"] for r in results["collapse"]})
        out += ["", "Final training loss of the joint dynamics (paraboloid 1H) by β·M (rows) and M (columns):", "",
                "| β·M | " + " | ".join(f"M = {M}" for M in Ms) + " |", "|---" * (len(Ms) + 1) + "|"]
        for bm in bms:
            vals = {r["M"]: r["train_loss"] for r in results["collapse"] if r["beta_M"] == bm}
            out.append(f"| {bm:g} | " + " | ".join(_fmt(vals[M]) for M in Ms) + " |")
    if results.get("summary"):
        out += ["", *results["summary"]]
    return "\n".join(out) + "\n"


def paper_comparison(rows: list[dict]) -> list[str]:
    """Our full-length joint and SGD runs beside the paper's Table 1."""
    out = ["| task | depth | joint test | paper's sheaf test | SGD test | paper's SGD test | joint / SGD | "
           "paper's ratio |", "|---|---|---|---|---|---|---|---|"]
    test = {(r["task"], r["depth"], r["method"]): r["test_loss"] for r in rows}
    for (task, depth), (sheaf, sgd, ratio) in PAPER_TABLE1.items():
        if (task, depth, "joint") in test:
            ours, base = test[task, depth, "joint"], test[task, depth, "sgd"]
            out.append(f"| {task} | {depth} | {ours:.4g} | {sheaf:g} | {base:.4g} | {sgd:g} | {ours / base:.1f}× | "
                       f"{ratio:g}× |")
    return out


def summary(rows: list[dict]) -> list[str]:
    lines = []
    for (task, depth) in sorted({(r["task"], r["depth"]) for r in rows}):
        local = [r for r in rows if (r["task"], r["depth"]) == (task, depth) and r["method"] in LOCAL]
        best = min(local, key=lambda r: r["test_loss"])
        ok = best["ratio_sgd"] <= 1.5 and best["time_vs_joint"] <= 0.1
        lines.append(f"- {task} {depth}: best local mode `{best['method']}` at {best['ratio_sgd']:.2f}× SGD's test "
                     f"loss in {best['time_vs_joint']:.3f} of the joint run's time — target "
                     f"{'met' if ok else 'NOT met'}")
    return lines


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="joint runs 20x shorter (full length projected)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tasks", nargs="*", default=list(TASKS))
    p.add_argument("--depths", nargs="*", default=list(DEPTHS))
    p.add_argument("--skip", nargs="*", default=[], choices=["digits", "collapse"])
    p.add_argument("--speed", action="store_true", help="only the cost of one update against a backprop step")
    p.add_argument("--cnn", action="store_true", help="only a small CNN on digits images: nudged vs backprop")
    p.add_argument("--pool", choices=["max", "avg"], default="max", help="the --cnn model's pooling (default max)")
    p.add_argument("--reps", type=int, default=50, help="interleaved repetitions of each --speed measurement")
    p.add_argument("--budget", type=float, default=0.1, help="wall time of each local mode, as a fraction of the "
                   "joint run's (default 0.1, the target)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    results = {"command": " ".join(["python benchmarks/bench_train.py", *(argv if argv is not None else sys.argv[1:])]),
               "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
               "threads": torch.get_num_threads(), "quick": args.quick}
    if args.speed:
        speed(args.reps, args.seed)
        return
    if args.cnn:
        cnn_digits(args.seed, pool=args.pool)
        return
    stem = "bench_train_quick" if args.quick else "bench_train"
    results["table1"] = []
    for rows in table1(args.quick, args.seed, args.tasks, args.depths, args.budget):
        results["table1"] += rows
        results["summary"] = summary(results["table1"])
        save(results, stem)  # after every configuration: a long run interrupted keeps what it measured
    if "digits" not in args.skip:
        results["digits"] = digits(args.quick, args.seed)
    if "collapse" not in args.skip:
        results["collapse"] = collapse(args.quick, args.seed)
    print(save(results, stem))


def save(results: dict, stem: str) -> str:
    """Write ``results`` as JSON and as the markdown tables under ``benchmarks/results/``; returns the markdown."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    text = markdown(results)
    (RESULTS / f"{stem}.json").write_text(json.dumps(results, indent=2))
    (RESULTS / f"{stem}.md").write_text(text)
    return text


if __name__ == "__main__":
    main()
