"""``python -m mvloss demo``: the heads on real data, face-verification metrics, plots, and a scale step.

1. Digits (scikit-learn's bundled 8x8 handwritten digits, no download) stand in for faces: a small CNN maps an
   image to an embedding and is trained with each head (Softmax, NormFace, CosFace, ArcFace, MV-Arc) on digits
   0-6 only.  Closed-set: accuracy on held-out images of 0-6.  Open-set (the face-verification setting): pairs
   of images of digits 7-9, never seen in training, are scored by the cosine of their embeddings: 10-fold pair
   accuracy on a balanced LFW-style pair set, TAR at FAR from all pairs, ROC.
2. A 3-d run on a few classes: embeddings on the unit sphere for Softmax, ArcFace and MV-Arc (sphere.png).
3. Scale step: a synthetic identity set with 100k classes (1M on a GPU), D=128, B=256: time per training step
   and peak memory of backend="auto" (fused) beside backend="reference" (materialises B x C), each in its own
   process.

Extra options after ``demo`` (besides --device/--quick/--out): --seeds N, --seed S (first seed), --epochs N,
--dim D, --scale-classes C, --scale-steps N, --threads N (scale step), --no-scale, --no-sphere, --no-progress.
See docs/demo.md.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from typing import Callable

import numpy as np
import torch
from torch import nn

from . import eval as mveval
from . import nn as mvnn

KNOWN = tuple(range(7))     # digits used for training (closed set)
UNKNOWN = (7, 8, 9)         # digits never seen in training (open set)
SPHERE_CLASSES = (0, 1, 2, 3, 4)
FARS = (1e-2, 1e-3, 1e-4)
SCALE = 16.0                # one scale for every normalised head: 7 classes need far less than 64


# --------------------------------------------------------------------------------------------------- heads
def head_factories(scale: float = SCALE) -> dict[str, Callable[[int, int], nn.Module]]:
    """Name -> (embedding_size, num_classes) -> head.  Normalised heads share the scale; margins are the papers'."""
    return {
        "Softmax": lambda d, c: mvnn.SoftmaxHead(d, c),
        "NormFace": lambda d, c: mvnn.NormFaceHead(d, c, s=scale),
        "CosFace": lambda d, c: mvnn.CosFaceHead(d, c, s=scale, margin=0.35),
        "ArcFace": lambda d, c: mvnn.ArcFaceHead(d, c, s=scale, margin=0.5),
        # MV-Arc, adaptive: h(cos) = (t + 1) cos + t on mis-classified negatives, t = mv_weight - 1 = 0.2
        "MV-Arc": lambda d, c: mvnn.MVSoftmaxHead(d, c, is_am=False, margin=0.5, mv_weight=1.2, scale=scale,
                                                  preset=None),
    }


HEAD_NOTES = {
    "Softmax": "x W^T + b, no normalisation",
    "NormFace": f"s={SCALE:g}",
    "CosFace": f"s={SCALE:g}, m=0.35",
    "ArcFace": f"s={SCALE:g}, m=0.5",
    "MV-Arc": f"s={SCALE:g}, m=0.5, adaptive t=0.2",
}


# --------------------------------------------------------------------------------------------------- data
def load_data(seed: int = 0):
    """Digits as (N, 1, 8, 8) float tensors, standardised with the training images' mean and std; the known
    classes split 75/25 per class into train/test (``seed`` fixes the split); the unknown classes whole."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    rng = np.random.default_rng(seed)
    train_idx, test_idx = [], []
    for c in KNOWN:
        idx = rng.permutation(np.flatnonzero(d.target == c))
        cut = int(round(0.75 * idx.size))
        train_idx += idx[:cut].tolist()
        test_idx += idx[cut:].tolist()
    open_idx = np.flatnonzero(np.isin(d.target, UNKNOWN))
    mean, std = x[train_idx].mean(), x[train_idx].std()
    x = (x - mean) / std
    return {
        "train": (x[train_idx], y[train_idx]),
        "test": (x[test_idx], y[test_idx]),
        "open": (x[open_idx], y[open_idx]),
    }


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random shifts of up to one pixel per image (the border filled with background)."""
    b = x.shape[0]
    padded = nn.functional.pad(x, (1, 1, 1, 1), value=float(x.amin()))  # the background value
    dx = torch.randint(0, 3, (b,), generator=gen)
    dy = torch.randint(0, 3, (b,), generator=gen)
    rows = (dy[:, None] + torch.arange(8)[None, :])                      # (b, 8)
    cols = (dx[:, None] + torch.arange(8)[None, :])
    return padded[:, 0][torch.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]].unsqueeze(1)


class EmbeddingNet(nn.Module):
    """A tiny CNN (37k parameters at dim 32): three 3x3 convs on the 8x8 image, then a linear embedding + BatchNorm
    (the insightface "features" layer)."""

    def __init__(self, dim: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),      # 4x4
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),      # 2x2
            nn.Flatten(), nn.Dropout(0.1), nn.Linear(64 * 4, dim), nn.BatchNorm1d(dim),
        )

    def forward(self, x):
        return self.body(x)


# --------------------------------------------------------------------------------------------------- training
def set_seed(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)


def train_head(name: str, factory, data, *, dim: int, epochs: int, seed: int, device: torch.device,
               batch_size: int = 64, lr: float = 2e-3, progress: bool = True, classes=KNOWN):
    """Train EmbeddingNet + head on ``classes`` (relabelled 0..n-1); returns (net, head, per-epoch mean losses,
    seconds per epoch, the digit -> head-class map)."""
    from tqdm.auto import tqdm

    set_seed(seed)
    x_tr, y_tr = data
    remap = torch.full((10,), -1, dtype=torch.long)
    remap[list(classes)] = torch.arange(len(classes))
    y_tr = remap[y_tr]
    net = EmbeddingNet(dim).to(device)
    head = factory(dim, len(classes)).to(device)
    params = list(net.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=5e-4)
    steps_per_epoch = math.ceil(x_tr.shape[0] / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch,
                                                pct_start=0.15)
    gen = torch.Generator().manual_seed(seed)
    losses, t0 = [], time.perf_counter()
    bar = tqdm(range(epochs), desc=f"{name:<9} seed {seed}", leave=False, disable=not progress, ncols=90)
    for _ in bar:
        net.train()
        head.train()
        perm = torch.randperm(x_tr.shape[0], generator=gen)
        total, count = 0.0, 0
        for i in range(0, perm.numel(), batch_size):
            idx = perm[i:i + batch_size]
            if idx.numel() < 2:  # BatchNorm needs two rows
                continue
            xb = augment(x_tr[idx], gen).to(device)
            yb = y_tr[idx].to(device)
            loss = head(net(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * idx.numel()
            count += idx.numel()
        losses.append(total / count)
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    sec_per_epoch = (time.perf_counter() - t0) / epochs
    net.eval()
    head.eval()
    return net, head, losses, sec_per_epoch, remap


@torch.no_grad()
def embed(net, x, device, batch: int = 512) -> torch.Tensor:
    return torch.cat([net(x[i:i + batch].to(device)).float().cpu() for i in range(0, x.shape[0], batch)])


@torch.no_grad()
def closed_set_accuracy(net, head, x, y, remap, device) -> float:
    feats = embed(net, x, device).to(device)
    pred = head.logits(feats).argmax(1).cpu()
    return float((pred == remap[y]).float().mean())


def open_set_metrics(net, x, y, device, pair_seed: int = 0):
    """Verification on unseen classes: 10-fold accuracy on a balanced pair set (3000 + 3000, as LFW), TAR@FAR
    and ROC from all pairs."""
    emb = embed(net, x, device)
    ia, ib, same = mveval.all_pairs(y)
    rep = mveval.verification_report(mveval.pair_scores(emb[ia], emb[ib]), same, fars=FARS)
    n = min(3000, int(same.sum()), int((~same).sum()))
    ba, bb, bsame = mveval.sample_pairs(y, n, n, seed=pair_seed)
    kf = mveval.kfold_accuracy(mveval.pair_scores(emb[ba], emb[bb]), bsame, n_folds=10)
    rep["accuracy"], rep["accuracy_std"], rep["n_balanced_pairs"] = kf.mean, kf.std, 2 * n
    return rep


# --------------------------------------------------------------------------------------------------- report
def _fmt_far(f: float) -> str:
    return f"{f:.0e}".replace("e-0", "e-")


def format_table(results: dict, fars_shown, n_seeds: int) -> str:
    pm = " +- " if n_seeds > 1 else ""
    cols = ["head", "closed-set acc", "open-set pair acc (10-fold)"] + \
        [f"TAR@FAR={_fmt_far(f)}" for f in fars_shown] + ["AUC", "s/epoch"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for name, r in results.items():
        def ms(key, sub=None):
            vals = [run[key] if sub is None else run[key][sub] for run in r["runs"]]
            m, s = float(np.mean(vals)), float(np.std(vals))
            return f"{m:.4f}{pm}{s:.4f}" if n_seeds > 1 else f"{m:.4f}"
        # with one seed the 10-fold std is the spread shown
        open_acc = ms("open_acc") if n_seeds > 1 else \
            f"{r['runs'][0]['open_acc']:.4f} +- {r['runs'][0]['open_acc_fold_std']:.4f}"
        row = [name, ms("closed_acc"), open_acc] + [ms("tar", _fmt_far(f)) for f in fars_shown] + \
            [ms("auc"), f"{np.mean([run['sec_per_epoch'] for run in r['runs']]):.2f}"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------- plots
def plot_losses(results: dict, path: str) -> None:
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.0), squeeze=False)
    for ax, name in zip(axes[0], names):
        for run in results[name]["runs"]:
            ax.plot(np.arange(1, len(run["losses"]) + 1), run["losses"], lw=1.2, label=f"seed {run['seed']}")
        ax.set_title(f"{name}\n{HEAD_NOTES.get(name, '')}", fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("training loss (mean per epoch)")
    if len(results[names[0]]["runs"]) > 1:
        axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_roc(rocs: dict, path: str, subtitle: str) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.6, 4.4))
    for name, (fpr, tpr, auc_v) in rocs.items():
        keep = fpr > 0
        ax.plot(fpr[keep], tpr[keep], lw=1.5, label=f"{name} (AUC {auc_v:.4f})")
    ax.set_xscale("log")
    ax.set_xlim(1e-5, 1.0)
    ax.set_ylim(0.0, 1.01)
    ax.set_xlabel("false accept rate (FAR)")
    ax.set_ylabel("true accept rate (TAR)")
    ax.set_title(f"Open-set verification ROC, unseen digits 7-9\n{subtitle}", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def angular_spread(emb: np.ndarray, y: np.ndarray) -> float:
    """Mean angle (degrees) between a normalised embedding and its class's mean direction."""
    e = emb / np.linalg.norm(emb, axis=1, keepdims=True).clip(1e-12)
    angles = []
    for c in np.unique(y):
        m = e[y == c]
        centre = m.mean(0)
        centre /= max(np.linalg.norm(centre), 1e-12)
        angles.append(np.degrees(np.arccos(np.clip(m @ centre, -1.0, 1.0))))
    return float(np.concatenate(angles).mean())


def plot_sphere(points: dict, path: str) -> None:
    import matplotlib.pyplot as plt

    names = list(points)
    fig = plt.figure(figsize=(4.2 * len(names), 4.4))
    u, v = np.mgrid[0:2 * np.pi:30j, 0:np.pi:16j]
    colors = plt.get_cmap("tab10")
    for i, name in enumerate(names):
        emb, y, acc = points[name]
        ax = fig.add_subplot(1, len(names), i + 1, projection="3d")
        ax.plot_wireframe(np.cos(u) * np.sin(v), np.sin(u) * np.sin(v), np.cos(v), color="0.85", lw=0.4)
        e = emb / np.linalg.norm(emb, axis=1, keepdims=True).clip(1e-12)
        for c in np.unique(y):
            m = y == c
            ax.scatter(e[m, 0], e[m, 1], e[m, 2], s=5, color=colors(int(c)), label=str(int(c)), depthshade=False)
        ax.set_title(f"{name}\nheld-out acc {acc:.3f}, mean angle to class centre "
                     f"{angular_spread(emb, y):.1f} deg", fontsize=9)
        ax.set_box_aspect((1, 1, 1))
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_zticks([])
    fig.axes[0].legend(title="digit", fontsize=7, loc="upper left", markerscale=2)
    fig.suptitle("3-d embeddings of held-out digits 0-4, normalised onto the unit sphere", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------- scale step
def _scale_child(backend: str, num_classes: int, dim: int, batch: int, steps: int, device: str,
                 threads=None) -> dict:
    """Runs in a fresh process: a linear embedding + head on a synthetic identity set, a few SGD steps.  Peak extra
    memory: the high-water mark over the steps after a warm-up step, above what the warm-up left allocated (weights,
    gradients, momentum), the benchmark's measure (mvloss.bench.runner)."""
    from .bench.runner import peak_mb, peak_start

    if threads:
        torch.set_num_threads(int(threads))

    dev = torch.device(device)
    torch.manual_seed(0)
    cuda = dev.type == "cuda"
    # identities: a random unit center per class; a sample is its center plus noise (generated per batch)
    centers = torch.nn.functional.normalize(torch.randn(num_classes, dim, device=dev), dim=1)
    embedder = nn.Linear(dim, dim).to(dev)
    head = mvnn.ArcFaceHead(dim, num_classes, s=64.0, margin=0.5, backend=backend).to(dev)
    opt = torch.optim.SGD(list(embedder.parameters()) + list(head.parameters()), lr=0.01, momentum=0.9)
    gen = torch.Generator(device=dev).manual_seed(0)

    def batch_data():
        labels = torch.randint(0, num_classes, (batch,), device=dev, generator=gen)
        x = centers[labels] + 0.3 * torch.randn(batch, dim, device=dev, generator=gen)
        return x, labels

    def sync():
        if cuda:
            torch.cuda.synchronize(dev)

    def one_step():
        x, labels = batch_data()
        loss = head(embedder(x), labels)
        opt.zero_grad(set_to_none=False)
        loss.backward()
        opt.step()
        return float(loss.detach())

    from .dispatch import CallSpec, select
    spec = CallSpec(device=dev, dtype=torch.float32, batch=batch, num_classes=num_classes, dim=dim,
                    has_bias=False, scale_requires_grad=False, bias_requires_grad=False)
    out = {"backend": backend, "resolved": select(backend, spec).name, "device": str(dev),
           "threads": torch.get_num_threads()}
    try:
        losses, times = [], []

        def timed_step():
            sync()
            t0 = time.perf_counter()
            losses.append(one_step())
            sync()
            times.append(time.perf_counter() - t0)

        timed_step()  # warm-up: allocates gradients and momentum, pays first-call costs
        base = peak_start(dev)
        for _ in range(steps):
            timed_step()
        out.update(ok=True, ms_per_step=1000 * float(np.median(times[1:])), best_ms=1000 * float(min(times[1:])),
                   peak_extra_mb=peak_mb(dev, base), losses=losses, warmup_ms=1000 * times[0])
    except (torch.OutOfMemoryError, MemoryError) as exc:
        out.update(ok=False, error=f"out of memory: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
    except RuntimeError as exc:
        msg = str(exc).splitlines()[0][:200]
        oom = any(k in msg.lower() for k in ("out of memory", "can't allocate", "cannot allocate", "not enough memory"))
        out.update(ok=False, error=("out of memory: " if oom else "error: ") + msg)
    return out


def run_scale_step(num_classes: int, dim: int, batch: int, steps: int, device: str, threads=None,
                   timeout: float = 240.0) -> list:
    """backend="auto" and backend="reference", each in its own process (clean peak-memory numbers; an OOM kill
    of the reference cannot take the demo down)."""
    results = []
    for backend in ("auto", "reference"):
        code = ("import json, sys; from mvloss.demo import _scale_child; "
                f"r = _scale_child({backend!r}, {num_classes}, {dim}, {batch}, {steps}, {device!r}, {threads!r}); "
                "print('MVLOSS_SCALE_RESULT ' + json.dumps(r))")
        t0 = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            results.append({"backend": backend, "ok": False, "error": f"timed out after {timeout:.0f} s"})
            continue
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("MVLOSS_SCALE_RESULT ")]
        if proc.returncode == 0 and line:
            r = json.loads(line[-1].split(" ", 1)[1])
        elif proc.returncode in (-9, 137):
            r = {"backend": backend, "ok": False, "error": "killed (SIGKILL): out of memory, most likely"}
        else:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]
            r = {"backend": backend, "ok": False, "error": f"exit code {proc.returncode}: {tail}"}
        r["wall_s"] = time.perf_counter() - t0
        results.append(r)
    return results


def format_scale(results: list, num_classes: int, dim: int, batch: int, device: str) -> str:
    lines = [f"Scale step: ArcFace head, C={num_classes:,} classes, D={dim}, B={batch}, SGD, on {device} "
             f"(B x C = {batch * num_classes * 4 / 2 ** 20:,.0f} MB in fp32)", "",
             "| backend | ran as | ms / step, median (best) | peak extra memory (MB) | loss, first -> last step |",
             "|---|---|---|---|---|"]
    for r in results:
        if r.get("ok"):
            lines.append(f"| {r['backend']} | {r['resolved']} | {r['ms_per_step']:.0f} ({r['best_ms']:.0f}) "
                         f"| {r['peak_extra_mb']:.0f} "
                         f"| {r['losses'][0]:.3f} -> {r['losses'][-1]:.3f} |")
        else:
            lines.append(f"| {r['backend']} | {r.get('resolved', '?')} | - | - | failed: {r['error']} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------- main
def _parse_rest(rest) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m mvloss demo", add_help=False)
    p.add_argument("--seeds", type=int, default=None, help="seeds per head (default 3, --quick 1)")
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--epochs", type=int, default=None, help="epochs per run (default 20, --quick 12)")
    p.add_argument("--dim", type=int, default=32, help="embedding dimension")
    p.add_argument("--scale-classes", type=int, default=None, help="classes of the scale step")
    p.add_argument("--scale-steps", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch threads of the scale step (default: torch's)")
    p.add_argument("--no-scale", action="store_true")
    p.add_argument("--no-sphere", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(list(rest or []))


def main(args, rest=()) -> int:
    """Entry point of ``python -m mvloss demo``: ``args`` has .device, .quick, .out; ``rest`` the extra options."""
    opts = _parse_rest(rest)
    device = torch.device(getattr(args, "device", None) or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"mvloss demo: --device {device} asked for, but CUDA is not available", file=sys.stderr)
        return 2
    threads = torch.get_num_threads()
    try:
        return _run(args, opts, device)
    finally:
        torch.set_num_threads(threads)


def _run(args, opts, device: torch.device) -> int:
    t_start = time.perf_counter()
    quick = bool(getattr(args, "quick", False))
    out = getattr(args, "out", None) or "demo_out"
    os.makedirs(out, exist_ok=True)
    import matplotlib

    matplotlib.use("Agg")
    n_seeds = opts.seeds or (1 if quick else 3)
    epochs = opts.epochs or (12 if quick else 20)
    seeds = list(range(opts.seed, opts.seed + n_seeds))
    progress = not opts.no_progress
    if device.type == "cpu":
        # the digits model is tiny: one thread is as fast as several and does not collapse on a busy machine
        # (OpenMP threads spinning against other processes); the scale step's processes use opts.threads
        torch.set_num_threads(1)

    print(f"mvloss demo: device {device}, {'quick' if quick else 'full'} mode, {epochs} epochs x {n_seeds} "
          f"seed(s), embedding dim {opts.dim}, torch threads {torch.get_num_threads()}")
    data = load_data(seed=0)
    x_open, y_open = data["open"]
    print(f"digits: train {data['train'][0].shape[0]} / test {data['test'][0].shape[0]} images of classes "
          f"{KNOWN[0]}-{KNOWN[-1]}; open set {x_open.shape[0]} images of unseen classes {UNKNOWN}")

    results, rocs = {}, {}
    for name, factory in head_factories().items():
        runs = []
        for seed in seeds:
            net, head, losses, spe, remap = train_head(name, factory, data["train"], dim=opts.dim, epochs=epochs,
                                                       seed=seed, device=device, progress=progress)
            closed = closed_set_accuracy(net, head, *data["test"], remap, device)
            rep = open_set_metrics(net, x_open, y_open, device, pair_seed=seed)
            runs.append({"seed": seed, "closed_acc": closed, "open_acc": rep["accuracy"],
                         "open_acc_fold_std": rep["accuracy_std"], "auc": rep["auc"],
                         "tar": {_fmt_far(f): v for f, v in rep["tar_at_far"].items()},
                         "sec_per_epoch": spe, "losses": losses})
            if seed == seeds[0]:
                fpr, tpr, _ = rep["roc"]
                rocs[name] = (fpr, tpr, rep["auc"])
                far_ok = rep["far_reliable"]
                n_pos, n_neg = rep["n_pos"], rep["n_neg"]
            print(f"  {name:<9} seed {seed}: closed {closed:.4f}  open {rep['accuracy']:.4f}  "
                  f"TAR@1e-2 {rep['tar_at_far'][1e-2]:.4f}  AUC {rep['auc']:.4f}  ({spe:.2f} s/epoch)")
        results[name] = {"note": HEAD_NOTES.get(name, ""), "runs": runs}
    fars_shown = [f for f in FARS if far_ok[f] and f * n_neg >= 10]   # >= 10 false accepts to count on

    table = format_table(results, fars_shown, n_seeds)
    print()
    print(f"Results ({n_seeds} seed(s){', mean +- std over seeds' if n_seeds > 1 else ''}; open set: "
          f"{n_pos:,} same / {n_neg:,} different pairs of unseen digits; pair accuracy on a balanced 6,000-pair "
          f"LFW-style set, 10 folds):")
    print(table)

    plot_losses(results, os.path.join(out, "loss_curves.png"))
    plot_roc(rocs, os.path.join(out, "roc.png"), f"dim {opts.dim}, {epochs} epochs, seed {seeds[0]}")

    sphere = {}
    if not opts.no_sphere:
        sphere_epochs = 15 if quick else 30  # 3-d Softmax needs them; about 0.1 s an epoch
        keep = torch.isin(data["train"][1], torch.tensor(SPHERE_CLASSES))
        keep_te = torch.isin(data["test"][1], torch.tensor(SPHERE_CLASSES))
        facts = head_factories()
        for name in ("Softmax", "ArcFace", "MV-Arc"):
            net, head, _, _, remap = train_head(f"{name} 3-d", facts[name],
                                                (data["train"][0][keep], data["train"][1][keep]), dim=3,
                                                epochs=sphere_epochs, seed=seeds[0], device=device,
                                                progress=progress, classes=SPHERE_CLASSES)
            xt, yt = data["test"][0][keep_te], data["test"][1][keep_te]
            acc = closed_set_accuracy(net, head, xt, yt, remap, device)
            emb = embed(net, xt, device).numpy()
            sphere[name] = (emb, yt.numpy(), acc)
        plot_sphere(sphere, os.path.join(out, "sphere.png"))
        print("3-d run on digits 0-4 (held-out accuracy, mean angle to class centre): " +
              ", ".join(f"{k} {v[2]:.3f} / {angular_spread(v[0], v[1]):.1f} deg" for k, v in sphere.items()))

    scale_results, scale_text = [], ""
    if not opts.no_scale:
        cuda = device.type == "cuda"
        num_classes = opts.scale_classes or (1_000_000 if cuda else 100_000)
        steps = opts.scale_steps or (3 if quick else 5)
        print(f"\nscale step: {num_classes:,} classes, backend auto vs reference, {steps} steps each ...",
              flush=True)
        scale_results = run_scale_step(num_classes, 128, 256, steps, str(device), threads=opts.threads)
        scale_text = format_scale(scale_results, num_classes, 128, 256, str(device))
        print(scale_text)

    total = time.perf_counter() - t_start
    summary = {
        "device": str(device), "mode": "quick" if quick else "full", "epochs": epochs, "seeds": seeds,
        "dim": opts.dim, "torch": torch.__version__, "digits_threads": torch.get_num_threads(),
        "open_set": {"classes": list(UNKNOWN), "n_pos": n_pos, "n_neg": n_neg, "balanced_pairs": 6000,
                     "fars_shown": fars_shown},
        "heads": {name: {"note": r["note"], "runs": r["runs"],
                         "mean": {"closed_acc": float(np.mean([x["closed_acc"] for x in r["runs"]])),
                                  "open_acc": float(np.mean([x["open_acc"] for x in r["runs"]])),
                                  "auc": float(np.mean([x["auc"] for x in r["runs"]])),
                                  "sec_per_epoch": float(np.mean([x["sec_per_epoch"] for x in r["runs"]]))}}
                  for name, r in results.items()},
        "sphere": {k: {"heldout_acc": v[2], "mean_angle_deg": angular_spread(v[0], v[1])} for k, v in sphere.items()},
        "scale": scale_results,
        "total_seconds": total,
    }
    with open(os.path.join(out, "results.json"), "w") as fh:
        json.dump(summary, fh, indent=1)
    with open(os.path.join(out, "results.md"), "w") as fh:
        fh.write(f"# mvloss demo results ({summary['mode']} mode, {device}, {total:.0f} s)\n\n")
        fh.write(f"Digits 0-6 for training, embedding dim {opts.dim}, {epochs} epochs, seeds {seeds}.\n\n")
        fh.write(table + "\n\n")
        if scale_text:
            fh.write(scale_text + "\n")
    print(f"\nwrote {out}/results.json, results.md, loss_curves.png, roc.png"
          f"{', sphere.png' if sphere else ''}  (total {total:.0f} s)")
    return 0
