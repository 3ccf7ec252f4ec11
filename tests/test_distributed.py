"""Class-parallel head (mvloss.distributed): gloo on CPU with 1, 2 and 3 processes against the single-process loss.

Every worker builds the same global data, computes the single-process result (``margin_softmax_loss`` on the full W
and the global batch) itself, and checks loss, its rows of dx and its shard of dW; a failing assertion in a worker
fails the test with the worker's traceback.  Workers start from a forkserver (spawn where there is none).
"""
from __future__ import annotations

import multiprocessing
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mvloss.distributed import ClassParallelHead, _Comm, class_split, reshard_state_dicts, shard_sizes
from mvloss.functional import margin_softmax_loss

D, C, B_LOCAL = 16, 23, 5

CASES = {
    "arcface": dict(scale=64.0, m2=0.5),
    "cosface": dict(scale=64.0, m3=0.35),
    "mv-arc": dict(scale=64.0, m2=0.5, mv="adaptive", t=0.2),
    "mv-arc-smooth-hard": dict(scale=32.0, m2=0.5, mv="fixed", t=0.2, label_smoothing=0.1, hard_ratio=0.7),
    "cosface-sum": dict(scale=32.0, m3=0.35, reduction="sum", focal_gamma=2.0),
    "arcface-none": dict(scale=32.0, m2=0.5, reduction="none"),
    "insightface": dict(scale=64.0, m2=0.5, preset="insightface", ignore_index=-1),
    "sphereface": dict(scale=30.0, m1=4.0, sphere_lambda=5.0),
    "interclass-filtering": dict(scale=64.0, m2=0.5, interclass_filtering_threshold=0.2),
}


# ------------------------------------------------------------------------------------------------------- harness
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, fn, args):
    import torch.utils.deterministic as det

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True, warn_only=True)
    det.fill_uninitialized_memory = True  # uninitialised memory is NaN, as in the rest of the suite
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def _spawn(world, fn, *args):
    # forkserver: a fresh interpreter (like spawn, safe with threads) that imports torch once for the whole file
    # instead of once per worker (about 5 s each on a busy 2-core machine).
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    if method == "forkserver":
        multiprocessing.set_forkserver_preload(["torch", "torch.distributed", "mvloss.distributed"])
    mp.start_processes(_entry, args=(world, _free_port(), fn, args), nprocs=world, join=True, start_method=method)


def _close(actual, expected, what, rtol=1e-5):
    """Equal to rtol relative to the largest magnitude of ``expected`` (fp32 rounding of a different summation)."""
    actual, expected = actual.detach().double(), expected.detach().double()
    atol = rtol * max(float(expected.abs().max()), 1e-6) if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def _data(sizes, seed=0, ignore_index=-100, all_ignored_rank=None):
    """Global batch (x, labels) split by ``sizes`` and the full W; a few rows ignored."""
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    x = torch.randn(n, D, generator=g)
    w = torch.randn(C, D, generator=g) * 0.1
    y = torch.randint(0, C, (n,), generator=g)
    y[3] = ignore_index
    if n > 11:
        y[11] = ignore_index
    # Make some targets hard (cos_y small) so the MV mask and the ArcFace fallback both matter.
    x[1] = -w[y[1]] * 5 + 0.1 * x[1]
    if all_ignored_rank is not None:
        start = sum(sizes[:all_ignored_rank])
        y[start:start + sizes[all_ignored_rank]] = ignore_index
    return x, y, w


def _rows(sizes, rank):
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def _reference(x, w, y, kw):
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    loss = margin_softmax_loss(xr, wr, y, backend="chunked", **kw)
    loss.sum().backward()
    return loss.detach(), xr.grad, wr.grad


def _head(kw, group=None, **opts):
    return ClassParallelHead(D, C, process_group=group, backend="chunked", **opts, **kw)


def _run_head(head, x, y, sizes, rank):
    xl = x[_rows(sizes, rank)].clone().requires_grad_()
    loss = head(xl, y[_rows(sizes, rank)])
    loss.sum().backward()
    return loss.detach(), xl.grad, head.weight.grad


def _check_against_reference(rank, world, kw, sizes, all_ignored_rank=None, tag=""):
    x, y, w = _data(sizes, ignore_index=kw.get("ignore_index", -100), all_ignored_rank=all_ignored_rank)
    ref_loss, ref_dx, ref_dw = _reference(x, w, y, kw)
    head = _head(kw)
    head.load_full_state_dict({"weight": w})
    loss, dx, dw = _run_head(head, x, y, sizes, rank)
    start, end = class_split(C, world, rank)[0], sum(class_split(C, world, rank))
    _close(loss, ref_loss, f"{tag} loss rank {rank}/{world}")
    _close(dx, ref_dx[_rows(sizes, rank)], f"{tag} dx rank {rank}/{world}")
    _close(dw, ref_dw[start:end], f"{tag} dW rank {rank}/{world}")
    # The reported loss is the global one, bitwise the same on every rank.
    everyone = [torch.empty_like(loss) for _ in range(world)]
    dist.all_gather(everyone, loss)
    assert all(torch.equal(e, loss) for e in everyone), f"{tag}: ranks report different losses"


def _gloo_has_reduce_scatter():
    """Whether this PyTorch's gloo implements reduce-scatter (recent releases); every rank gets the same answer."""
    return hasattr(dist, "reduce_scatter_single")


# ------------------------------------------------------------------------------------------------------- workers
def _worker_equivalence(rank, world):
    even = [B_LOCAL] * world
    for name, kw in CASES.items():
        _check_against_reference(rank, world, kw, even, tag=name)
    # A rank whose local batch is all ignored; uneven (and empty) local batches.
    _check_against_reference(rank, world, CASES["mv-arc"], even, all_ignored_rank=world - 1, tag="all-ignored")
    uneven = [B_LOCAL + 2 * r - 1 if r else 0 for r in range(world)] if world > 1 else [4]
    _check_against_reference(rank, world, CASES["arcface"], uneven, tag="uneven-batches")
    # The reduce-scatter path of the embeddings' backward (what NCCL uses), on gloo where this PyTorch has it.
    if world > 1 and _gloo_has_reduce_scatter():
        _Comm.REDUCE_SCATTER = {"cpu": "gloo"}
        try:
            _check_against_reference(rank, world, CASES["cosface"], even, tag="reduce-scatter")
            _check_against_reference(rank, world, CASES["cosface"], uneven, tag="reduce-scatter uneven")
        finally:
            _Comm.REDUCE_SCATTER = {"cuda": "nccl"}

    # A learnable scale: its gradient is the full one on every rank.
    x, y, w = _data(even)
    scale_ref = torch.tensor(30.0, requires_grad=True)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    margin_softmax_loss(xr, wr, y, scale=scale_ref, m3=0.35, backend="chunked").backward()
    scale = torch.tensor(30.0, requires_grad=True)
    head = _head(dict(scale=scale, m3=0.35))
    head.load_full_state_dict(w)
    _run_head(head, x, y, even, rank)
    _close(scale.grad, scale_ref.grad, "learnable scale grad")

    # CurricularFace: tau (buffer "t") moves identically on every rank and like the single-process EMA.
    tau_ref = torch.zeros(1)
    kw = dict(scale=32.0, m2=0.5, mv="curricular", tau_momentum=0.01)
    head = _head(kw)
    head.load_full_state_dict(w)
    for step in range(2):
        x, y, _ = _data(even, seed=step + 1)
        ref_loss, ref_dx, _ = _reference(x, w, y, dict(kw, t=tau_ref))
        loss, dx, _ = _run_head(head, x, y, even, rank)
        _close(loss, ref_loss, "curricular loss")
        _close(dx, ref_dx[_rows(even, rank)], "curricular dx")
    _close(head.t, tau_ref, "curricular tau")

    # ddp_compensation: the embeddings' gradient times the world size.
    x, y, w = _data(even)
    _, ref_dx, _ = _reference(x, w, y, CASES["arcface"])
    head = _head(CASES["arcface"], ddp_compensation=True)
    head.load_full_state_dict(w)
    _, dx, _ = _run_head(head, x, y, even, rank)
    _close(dx, ref_dx[_rows(even, rank)] * world, "ddp_compensation dx")

    # DDP on a backbone + ddp_compensation: after DDP averages, the backbone's gradient is the single-process one.
    inputs = torch.randn(sum(even), 8, generator=torch.Generator().manual_seed(5))
    backbone_ref = torch.nn.Linear(8, D)
    torch.nn.init.normal_(backbone_ref.weight, generator=torch.Generator().manual_seed(6))
    margin_softmax_loss(backbone_ref(inputs), w, y, backend="chunked", **CASES["mv-arc"]).backward()
    backbone = torch.nn.Linear(8, D)
    backbone.load_state_dict(backbone_ref.state_dict())
    ddp = torch.nn.parallel.DistributedDataParallel(backbone)
    head = _head(CASES["mv-arc"], ddp_compensation=True)
    head.load_full_state_dict(w)
    head(ddp(inputs[_rows(even, rank)]), y[_rows(even, rank)]).backward()
    _close(backbone.weight.grad, backbone_ref.weight.grad, "DDP backbone weight grad")
    _close(backbone.bias.grad, backbone_ref.bias.grad, "DDP backbone bias grad")

    # sample_rate = 1 is the unsampled head.
    head = _head(CASES["mv-arc"], sample_rate=1.0)
    head.load_full_state_dict(w)
    loss1, dx1, dw1 = _run_head(head, x, y, even, rank)
    head = _head(CASES["mv-arc"])
    head.load_full_state_dict(w)
    loss0, dx0, dw0 = _run_head(head, x, y, even, rank)
    assert torch.equal(loss1, loss0) and torch.equal(dx1, dx0) and torch.equal(dw1, dw0)

    # Full state dict: gathered on rank 0 only, or on every rank.
    full = head.full_state_dict()
    if rank == 0:
        assert torch.equal(full["weight"], w)
    else:
        assert full is None
    assert torch.equal(head.full_state_dict(rank0_only=False)["weight"], w)


def _worker_sampling(rank, world):
    sizes = [B_LOCAL] * world
    for kw in (CASES["arcface"], CASES["mv-arc"], dict(CASES["mv-arc-smooth-hard"], hard_ratio=1.0)):
        for seed in range(3):
            x, y, w = _data(sizes, seed=seed)
            head = _head(kw, sample_rate=0.4, generator=torch.Generator().manual_seed(100 * rank + seed))
            head.load_full_state_dict(w)
            loss, dx, dw = _run_head(head, x, y, sizes, rank)
            index = head.last_sampled_index
            start, n_local = class_split(C, world, rank)
            # Positives of the global batch that this rank owns are always sampled; at least num_sample classes.
            valid = y != kw.get("ignore_index", -100)
            mine = y[valid & (y >= start) & (y < start + n_local)] - start
            assert set(mine.tolist()) <= set(index.tolist())
            assert index.numel() == max(head.num_sample, mine.unique().numel())
            assert torch.equal(index, index.unique(sorted=True))
            # Rows of W that were not sampled get exactly zero gradient.
            unsampled = torch.ones(n_local, dtype=torch.bool)
            unsampled[index] = False
            assert bool((dw[unsampled] == 0).all())
            # The loss equals the single-process loss on W restricted to the sampled classes of every rank.
            glob = index + start
            most = max(shard_sizes(C, world))
            gathered = [torch.empty(most, dtype=torch.long) for _ in range(world)]
            dist.all_gather(gathered, torch.cat([glob, glob.new_full((most - glob.numel(),), -1)]))
            sampled = torch.cat([g[g >= 0] for g in gathered])
            y_sub = torch.where(valid, torch.searchsorted(sampled, y.clamp_min(0)), y)
            ref_loss, ref_dx, ref_dw = _reference(x, w[sampled], y_sub, kw)
            _close(loss, ref_loss, f"sampled loss rank {rank}")
            _close(dx, ref_dx[_rows(sizes, rank)], f"sampled dx rank {rank}")
            mine_rows = (sampled >= start) & (sampled < start + n_local)
            _close(dw[index], ref_dw[mine_rows], f"sampled dW rank {rank}")
    # Eval mode uses every class.
    x, y, w = _data(sizes)
    head = _head(CASES["arcface"], sample_rate=0.4).eval()
    head.load_full_state_dict(w)
    loss, _, _ = _run_head(head, x, y, sizes, rank)
    _close(loss, _reference(x, w, y, CASES["arcface"])[0], "eval loss")
    assert head.last_sampled_index is None


def _worker_reshard(rank, world, tmpdir):
    """A 2-rank head (a subgroup of the 3 processes) saves per-rank shards; the 3-rank head loads them."""
    kw = CASES["mv-arc"]
    x, y, w = _data([B_LOCAL] * 3, seed=7)
    pair = dist.new_group([0, 1])
    if rank < 2:
        head2 = _head(kw, group=pair)
        assert head2.world_size == 2
        head2.load_full_state_dict(w)
        sizes2 = [8, 7]
        loss2, _, _ = _run_head(head2, x, y, sizes2, rank)
        torch.save(head2.state_dict(), os.path.join(tmpdir, f"shard{rank}.pt"))
        torch.save(loss2, os.path.join(tmpdir, "loss2.pt"))
        full2 = head2.full_state_dict()  # gathered on the subgroup's rank 0
        assert torch.equal(full2["weight"], w) if rank == 0 else full2 is None
    dist.barrier()
    shards = [torch.load(os.path.join(tmpdir, f"shard{r}.pt")) for r in range(2)]
    loss2 = torch.load(os.path.join(tmpdir, "loss2.pt"))
    assert [s["weight"].shape[0] for s in shards] == shard_sizes(C, 2)

    head3 = _head(kw)
    head3.reshard(shards)
    start, n = class_split(C, 3, rank)
    assert torch.equal(head3.weight.detach(), w[start:start + n])
    loss3, _, _ = _run_head(head3, x, y, [B_LOCAL] * 3, rank)
    _close(loss3, loss2, "2 -> 3 resharded loss")
    assert torch.equal(reshard_state_dicts(shards, 3)[rank]["weight"], head3.weight.detach())

    # insightface PartialFC_V2 per-rank checkpoints (same split rule) and a full W.
    head_v2 = _head(kw)
    head_v2.load_partial_fc_v2([{"weight": s["weight"]} for s in shards])
    assert torch.equal(head_v2.weight, head3.weight)
    head_v2 = _head(kw)  # whole arcface_torch training checkpoints (checkpoint_gpu_{rank}.pt)
    head_v2.load_partial_fc_v2([{"epoch": 1, "state_dict_softmax_fc": {"weight": s["weight"]}} for s in shards])
    assert torch.equal(head_v2.weight, head3.weight)
    head_full = _head(kw)
    head_full.reshard({"weight": w})
    assert torch.equal(head_full.weight, head3.weight)
    # Round trip back to 2 ranks through the gathered full W.
    full = head3.full_state_dict(rank0_only=False)
    assert torch.equal(full["weight"], w)
    back = reshard_state_dicts([full], 2)
    assert all(torch.equal(a["weight"], b["weight"]) for a, b in zip(back, shards))


# --------------------------------------------------------------------------------------------------------- tests
def test_class_split_matches_insightface():
    for classes in (1, 5, 23, 24, 1000):
        for world in (1, 2, 3, 7, 8):
            if classes < world:
                continue
            sizes = shard_sizes(classes, world)
            assert sum(sizes) == classes and max(sizes) - min(sizes) <= 1
            for rank in range(world):
                start, n = class_split(classes, world, rank)
                assert n == classes // world + int(rank < classes % world)
                assert start == classes // world * rank + min(rank, classes % world)
                assert start == sum(sizes[:rank])


def test_without_process_group_is_single_process_head():
    assert not dist.is_initialized()
    x, y, w = _data([9])
    for kw in (CASES["arcface"], CASES["mv-arc-smooth-hard"], CASES["arcface-none"]):
        head = _head(kw)
        assert head.world_size == 1 and head.num_local == C
        head.load_full_state_dict(w)
        loss, dx, dw = _run_head(head, x, y, [9], 0)
        ref_loss, ref_dx, ref_dw = _reference(x, w, y, kw)
        _close(loss, ref_loss, "loss")
        _close(dx, ref_dx, "dx")
        _close(dw, ref_dw, "dW")


def _grad_paths_into(loss, param) -> int:
    """How many edges of loss's graph end in param's gradient accumulator."""
    seen, stack, n = set(), [loss.grad_fn], 0
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for nxt, _ in node.next_functions:
            if nxt is not None and getattr(nxt, "variable", None) is param:
                n += 1
            stack.append(nxt)
    return n


@pytest.mark.parametrize("backend", ["chunked", "cpu"])
def test_weight_shard_gets_one_gradient_path(backend):
    """The target column's gradient reaches the W shard through the negatives pass (added into its dW), not through
    a gather of the target rows: no second dense W-sized gradient to allocate and add."""
    x, y, w = _data([9])
    head = ClassParallelHead(D, C, backend=backend, **CASES["mv-arc"])
    head.load_full_state_dict(w)
    loss = head(x, y)
    assert _grad_paths_into(loss, head.weight) == 1


def test_auto_backend():
    """Whatever fused backend "auto" picks here runs the local negatives pass."""
    x, y, w = _data([9])
    head = ClassParallelHead(D, C, **CASES["mv-arc"])
    head.load_full_state_dict(w)
    loss, dx, dw = _run_head(head, x, y, [9], 0)
    ref_loss, ref_dx, ref_dw = _reference(x, w, y, CASES["mv-arc"])
    _close(loss, ref_loss, "loss")
    _close(dx, ref_dx, "dx")
    _close(dw, ref_dw, "dW")


def test_init_does_not_depend_on_world_size():
    full = ClassParallelHead(D, C, init_seed=3).weight.detach()
    assert full.std().item() == pytest.approx(0.01, rel=0.2)
    again = ClassParallelHead(D, C, init_seed=3).weight.detach()
    assert torch.equal(full, again)
    parts = reshard_state_dicts([full], 3)
    assert torch.equal(torch.cat([p["weight"] for p in parts]), full)


def test_rejects_bad_options():
    with pytest.raises(ValueError):
        ClassParallelHead(D, C, sample_rate=0.0)
    with pytest.raises(ValueError):
        ClassParallelHead(D, C, mv="sideways")
    head = ClassParallelHead(D, C, backend="reference")
    with pytest.raises(ValueError, match="class-parallel"):
        head(torch.randn(2, D), torch.tensor([0, 1]))
    with pytest.raises(IndexError):
        ClassParallelHead(D, C)(torch.randn(2, D), torch.tensor([0, C]))
    with pytest.raises(ValueError):
        ClassParallelHead(D, C).load_partial_fc_v2([{"weight": torch.zeros(10, D)}, {"weight": torch.zeros(13, D)}])


@pytest.mark.parametrize("world", [1, 2, 3])
def test_matches_single_process(world):
    _spawn(world, _worker_equivalence)


@pytest.mark.parametrize("world", [2, 3])
def test_negative_class_sampling(world):
    _spawn(world, _worker_sampling)


def test_reshard_2_to_3(tmp_path):
    _spawn(3, _worker_reshard, str(tmp_path))
