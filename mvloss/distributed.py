"""Class-parallel training (insightface PartialFC style): each rank owns a contiguous slice of the class weights.

For class counts that outgrow one device.  ``ClassParallelHead`` keeps only its rank's rows of W; a forward

1. all-gathers the embeddings (autograd-aware) and the labels of every rank (the *global batch*),
2. computes the target cosine cos_iy on the rank that owns class y_i (zero on the others) and all-reduces it (sum);
   the negatives pass returns it again with its gradient, which it adds into its own dW of the shard (no second,
   dense W-sized gradient),
3. runs the O(B) target-side math (margin f, MV threshold, CurricularFace tau) on every rank, on the same global
   vectors -- the one definition in ``mvloss.margins`` / ``mvloss.loss``,
4. runs the negatives pass (``mvloss.negatives``, any fused backend) over the *local* classes only, giving a per-row
   partial (lse_r, zsum_r),
5. merges the partials: a global max by all-reduce MAX, the rescaled sum-exp by all-reduce SUM (differentiably:
   d lse / d lse_r = exp(lse_r - lse)), and finishes the per-row loss and reduction (``mvloss.loss.finish``).

The loss is the loss of the global batch and is returned identically on every rank.  Backward: the gradient of the
local W shard needs no communication; the gradient of the gathered embeddings is summed over ranks and each rank
keeps its own rows (one all-reduce, or a reduce-scatter on NCCL).  The gradients equal those of the single-process
head (``mvloss.functional.margin_softmax_loss`` on the full W and the global batch) up to fp32 rounding.

Class split (the same rule as insightface PartialFC / PartialFC_V2, so their per-rank checkpoints map 1:1)::

    num_local(rank)   = C // world + (1 if rank < C % world else 0)
    class_start(rank) = C // world * rank + min(rank, C % world)

i.e. the first ``C % world`` ranks own one class more.

Negative-class sampling (``sample_rate < 1``, training mode only): see ``ClassParallelHead``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from . import loss as _loss
from . import margins
from .label_check import check_label_range
from .config import LossConfig

__all__ = ["ClassParallelHead", "class_split", "shard_sizes", "reshard_state_dicts"]

# Rows per block of the world-size-independent initialisation (see ClassParallelHead.reset_parameters).
_INIT_BLOCK = 4096


# ----------------------------------------------------------------------------------------------------- the split rule
def class_split(num_classes: int, world_size: int, rank: int) -> tuple[int, int]:
    """(class_start, num_local) of ``rank``: insightface PartialFC's rule, the first C % world ranks get one more."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"bad rank {rank} for world size {world_size}")
    base, extra = divmod(num_classes, world_size)
    return base * rank + min(rank, extra), base + int(rank < extra)


def shard_sizes(num_classes: int, world_size: int) -> list[int]:
    """num_local of every rank, in rank order."""
    return [class_split(num_classes, world_size, r)[1] for r in range(world_size)]


def _shard_weight(shard) -> torch.Tensor:
    """The (rows, D) weight of one checkpoint entry: a tensor, or a state dict with a ``weight`` entry (a key ending
    in ``.weight`` is accepted when it is the only one, e.g. insightface's ``module_partial_fc.weight``)."""
    if isinstance(shard, torch.Tensor):
        return shard
    if "state_dict_softmax_fc" in shard:  # a whole insightface training checkpoint (checkpoint_gpu_{rank}.pt)
        shard = shard["state_dict_softmax_fc"]
    if "weight" in shard:
        return shard["weight"]
    keys = [k for k in shard if k.endswith(".weight")]
    if len(keys) != 1:
        raise KeyError(f"no unique 'weight' entry in checkpoint keys {sorted(shard)}")
    return shard[keys[0]]


def _copy_rows(dst: torch.Tensor, dst_start: int, shards: Sequence[torch.Tensor]) -> None:
    """Fill dst (rows [dst_start, dst_start + len(dst)) of the full W) from contiguous shards in class order."""
    dst_end, offset = dst_start + dst.shape[0], 0
    for shard in shards:
        lo, hi = max(dst_start, offset), min(dst_end, offset + shard.shape[0])
        if lo < hi:
            dst[lo - dst_start:hi - dst_start].copy_(shard[lo - offset:hi - offset])
        offset += shard.shape[0]


def reshard_state_dicts(shards: Sequence, world_size: int) -> list[dict]:
    """Offline: per-rank checkpoints of any world size (in rank order) -> ``world_size`` per-rank state dicts with
    this module's split rule.  Only ``weight`` is resharded; other entries (CurricularFace's ``t``) are copied."""
    weights = [_shard_weight(s) for s in shards]
    total = sum(w.shape[0] for w in weights)
    extra = {k: v for k, v in shards[0].items() if k == "t"} if isinstance(shards[0], dict) else {}
    out = []
    for r in range(world_size):
        start, n = class_split(total, world_size, r)
        w = torch.empty(n, weights[0].shape[1], dtype=weights[0].dtype, device=weights[0].device)
        _copy_rows(w, start, weights)
        out.append({"weight": w, **{k: v.clone() for k, v in extra.items()}})
    return out


# --------------------------------------------------------------------------------------------------- communication
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or getattr(dist, "reduce_scatter_tensor", None)


class _Comm:
    """The process group, the rank's place in it; every collective is a no-op for a world of one."""

    # Device type -> the backend whose reduce-scatter the embeddings' backward uses.  Elsewhere (gloo: only recent
    # PyTorch releases have its reduce-scatter) it is an all-reduce and a slice.
    REDUCE_SCATTER = {"cuda": "nccl"}

    def __init__(self, group):
        self.group = group
        if dist.is_available() and dist.is_initialized():
            self.world = dist.get_world_size(group)
            self.rank = dist.get_rank(group)
            self.backend = str(dist.get_backend(group))
        else:
            self.world, self.rank, self.backend = 1, 0, None

    @property
    def active(self) -> bool:
        return self.world > 1

    def all_reduce(self, t: torch.Tensor, op=None) -> torch.Tensor:
        if self.active:
            dist.all_reduce(t, op=dist.ReduceOp.SUM if op is None else op, group=self.group)
        return t

    def all_gather_rows(self, t: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
        """Concatenate every rank's rows (ranks may hold different row counts)."""
        if not self.active:
            return t
        t = t.contiguous()
        most = max(sizes)
        if t.shape[0] < most:
            t = torch.cat([t, t.new_zeros((most - t.shape[0],) + tuple(t.shape[1:]))])
        parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t, group=self.group)
        return torch.cat([p[:n] for p, n in zip(parts, sizes)])

    def sum_rows_to_owner(self, g: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
        """Sum a (sum(sizes), ...) tensor over ranks and return this rank's rows: a reduce-scatter where the backend
        has one for the tensor's device (see ``REDUCE_SCATTER``), else an all-reduce and a slice."""
        if not self.active:
            return g
        g = g.contiguous()
        if self.REDUCE_SCATTER.get(g.device.type, "?") in (self.backend or ""):
            most = max(sizes)
            if len(set(sizes)) > 1:  # pad every rank's block to the largest
                tail = tuple(g.shape[1:])
                g = torch.cat([torch.cat([p, p.new_zeros((most - p.shape[0],) + tail)]) for p in g.split(sizes)])
            out = g.new_empty((most,) + tuple(g.shape[1:]))
            _reduce_scatter(out, g, group=self.group)
            return out[:sizes[self.rank]]
        g = g.clone()
        dist.all_reduce(g, group=self.group)
        start = sum(sizes[:self.rank])
        return g[start:start + sizes[self.rank]]

    def batch_sizes(self, n: int, device) -> list[int]:
        if not self.active:
            return [n]
        mine = torch.tensor([n], dtype=torch.int64, device=device)
        parts = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(parts, mine, group=self.group)
        return torch.cat(parts).tolist()  # one host sync


class _GatherRows(torch.autograd.Function):
    """All-gather of the embeddings; backward: the summed gradient's rows of this rank (times ``grad_scale``)."""

    @staticmethod
    def forward(ctx, x, comm, sizes, grad_scale):
        ctx.comm, ctx.sizes, ctx.grad_scale = comm, sizes, grad_scale
        return comm.all_gather_rows(x, sizes)

    @staticmethod
    def backward(ctx, g):
        dx = ctx.comm.sum_rows_to_owner(g, ctx.sizes)
        if ctx.grad_scale != 1:
            dx = dx * ctx.grad_scale
        return dx, None, None, None


class _AllReduceSum(torch.autograd.Function):
    """y = sum over ranks of a.  Everything downstream is replicated (the same global loss on every rank), so the
    upstream gradient is the same on every rank and is the exact gradient of each rank's term: backward is identity."""

    @staticmethod
    def forward(ctx, a, comm):
        return comm.all_reduce(a.clone())

    @staticmethod
    def backward(ctx, g):
        return g, None


class _KnownSum(torch.autograd.Function):
    """_AllReduceSum of ``a`` whose sum over ranks, ``total``, is already known (all-reduced earlier without a
    graph): no second all-reduce; backward is the same identity."""

    @staticmethod
    def forward(ctx, a, total):
        return total.clone()

    @staticmethod
    def backward(ctx, g):
        return g, None


class _SumGradOverRanks(torch.autograd.Function):
    """Identity forward; backward sums the gradient over ranks.  For a replicated input (a learnable scale) that
    feeds a per-rank partial computation (the local negatives): each rank then holds the full gradient."""

    @staticmethod
    def forward(ctx, a, comm):
        ctx.comm = comm
        return a.clone()

    @staticmethod
    def backward(ctx, g):
        return ctx.comm.all_reduce(g.clone()), None


class _MergeLSE(torch.autograd.Function):
    """logsumexp over ranks of per-row partial log-sum-exps: max by all-reduce MAX, rescaled sums by all-reduce SUM.
    d lse / d lse_r = exp(lse_r - lse) (0 where the rank had no negative)."""

    @staticmethod
    def forward(ctx, lse_local, comm):
        top = comm.all_reduce(lse_local.detach().clone(), dist.ReduceOp.MAX if comm.active else None)
        top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
        total = comm.all_reduce(torch.exp(lse_local - top))
        lse = top + torch.log(total)
        ctx.save_for_backward(lse_local, lse)
        return lse

    @staticmethod
    def backward(ctx, g):
        lse_local, lse = ctx.saved_tensors
        w = torch.where(torch.isfinite(lse_local), torch.exp(lse_local - lse), torch.zeros_like(lse_local))
        return g * w, None


# ---------------------------------------------------------------------------------------------------------- the head
class ClassParallelHead(nn.Module):
    """A margin-softmax head whose class weights are split across the ranks of ``process_group``.

    ``forward(local_feats, local_labels)`` returns the loss of the global batch (every rank's rows), the same value on
    every rank; with ``reduction="none"`` the per-row losses of the global batch, rank 0's rows first.  Back-propagate
    the same expression of it on every rank (``loss.backward()``): the collectives' backward relies on it.
    ``loss_kwargs`` are the options of ``mvloss.functional.margin_softmax_loss`` (scale, m1, m2, m3, mv, t, preset,
    ignore_index, reduction, label_smoothing, focal_gamma, hard_ratio, ...); a class bias is not supported.  Ranks
    may pass different numbers of rows (even zero).

    ``weight`` is this rank's (num_local, D) shard, classes [class_start, class_start + num_local) in the
    insightface split (see ``class_split``); ``state_dict()`` is the per-rank shard (and ``t`` for CurricularFace),
    the same layout as an insightface PartialFC_V2 per-rank checkpoint.  Without an initialised process group, or in
    a world of one, this is a single-process head.

    ``sample_rate`` < 1 (PartialFC negative-class sampling, training mode only): each step, each rank keeps every
    local class that is the label of some row of the global batch (the positives) and fills up to
    ``max(1, int(sample_rate * num_local))`` classes with local classes drawn uniformly without replacement (all
    positives are kept when they alone exceed that); the negatives pass runs over those rows of W only
    (``index_select``), the softmax denominator holds the sampled classes, and the gradient of every other row of W
    is exactly zero.  This is what insightface PartialFC_V2 does (``torch.rand`` over the local classes, positives
    forced to 2.0, ``topk``, sorted); the random stream differs (drawn on W's device, from ``generator`` if given).
    The loss equals the single-process loss on W restricted to the sampled classes of all ranks (label smoothing
    then counts the sampled classes).  ``last_sampled_index`` holds the local indices used by the last step.
    In eval mode every class is used.

    ``ddp_compensation=True`` multiplies the embeddings' gradient by the world size, as insightface's AllGather does:
    DDP averages the backbone's gradients over ranks, so with it the backbone gets the gradient of the global-batch
    loss (what one process training on the whole global batch would get).  The default returns the exact gradient
    of the returned loss w.r.t. each rank's embeddings.  Do not wrap this head in DDP: its parameters differ per rank
    and its W gradient is already complete.  A learnable ``scale`` tensor gets its full gradient on every rank.
    """

    def __init__(self, embedding_size: int, num_classes: int, *, process_group=None, sample_rate: float = 1.0,
                 backend: str = "auto", ddp_compensation: bool = False, generator: Optional[torch.Generator] = None,
                 init_seed: Optional[int] = None, **loss_kwargs):
        super().__init__()
        if embedding_size < 1 or num_classes < 1:
            raise ValueError("embedding_size and num_classes must be positive")
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        if "bias" in loss_kwargs:
            raise ValueError("ClassParallelHead has no class bias")
        self.embedding_size, self.num_classes = embedding_size, num_classes
        self.process_group = process_group
        self.sample_rate = float(sample_rate)
        self.backend = backend
        self.ddp_compensation = ddp_compensation
        self.generator = generator
        self.loss_kwargs = dict(loss_kwargs)
        cfg = LossConfig(**self.loss_kwargs)  # reject bad options at construction
        comm = _Comm(process_group)
        if num_classes < comm.world:
            raise ValueError(f"num_classes={num_classes} is smaller than the world size {comm.world}")
        self.rank, self.world_size = comm.rank, comm.world
        self.class_start, self.num_local = class_split(num_classes, comm.world, comm.rank)
        self.num_sample = max(1, int(self.sample_rate * self.num_local))
        self.weight = nn.Parameter(torch.empty(self.num_local, embedding_size))
        if cfg.mv == "curricular":
            t = loss_kwargs.get("t", 0.0)
            self.register_buffer("t", torch.tensor([float(t)]))
        self.last_sampled_index: Optional[torch.Tensor] = None
        self.reset_parameters(init_seed)

    # ------------------------------------------------------------------------------------------------ parameters
    @property
    def class_end(self) -> int:
        return self.class_start + self.num_local

    def reset_parameters(self, seed: Optional[int] = None) -> None:
        """normal(0, 0.01) like PartialFC_V2, drawn in blocks of classes from generators seeded by (seed, block): the
        full W depends on the seed only, not on the world size, and ranks seeded alike still get different rows.
        ``seed`` defaults to ``torch.initial_seed()``."""
        seed = torch.initial_seed() if seed is None else int(seed)
        gen = torch.Generator()
        with torch.no_grad():
            first, last = self.class_start // _INIT_BLOCK, (self.class_end - 1) // _INIT_BLOCK
            for block in range(first, last + 1):
                gen.manual_seed((seed * 1_000_003 + block) % (2 ** 63))
                rows = torch.normal(0.0, 0.01, (_INIT_BLOCK, self.embedding_size), generator=gen)
                lo, hi = max(self.class_start, block * _INIT_BLOCK), min(self.class_end, (block + 1) * _INIT_BLOCK)
                self.weight[lo - self.class_start:hi - self.class_start].copy_(
                    rows[lo - block * _INIT_BLOCK:hi - block * _INIT_BLOCK])

    def config(self) -> LossConfig:
        kw = dict(self.loss_kwargs)
        if hasattr(self, "t"):
            kw["t"] = self.t
            kw["tau_momentum"] = self.loss_kwargs.get("tau_momentum", 0.0) if self.training else 0.0
        return LossConfig(**kw)

    # ---------------------------------------------------------------------------------------------------- sampling
    def _sample(self, positives: torch.Tensor) -> torch.Tensor:
        """Sorted local indices: every positive, filled up uniformly to num_sample (PartialFC_V2's rule)."""
        with torch.no_grad():
            positives = torch.unique(positives, sorted=True)
            if positives.numel() >= self.num_sample:
                return positives
            device = self.weight.device
            gen = self.generator
            if gen is not None and gen.device != device:
                raise ValueError(f"generator is on {gen.device}, the weight on {device}")
            rank_key = torch.rand(self.num_local, device=device, generator=gen)
            rank_key[positives] = 2.0
            return torch.topk(rank_key, self.num_sample).indices.sort().values

    # ----------------------------------------------------------------------------------------------------- forward
    def forward(self, local_feats: torch.Tensor, local_labels: torch.Tensor) -> torch.Tensor:
        cfg = self.config()
        comm = _Comm(self.process_group)
        if comm.world != self.world_size or comm.rank != self.rank:
            raise RuntimeError(f"the head was built for rank {self.rank} of {self.world_size}, the process group is "
                               f"now rank {comm.rank} of {comm.world}")
        labels = local_labels.reshape(-1)
        if local_feats.dim() != 2 or local_feats.shape[1] != self.embedding_size:
            raise ValueError(f"feats must be (batch, {self.embedding_size}), got {tuple(local_feats.shape)}")
        if labels.shape[0] != local_feats.shape[0] or labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError("labels must be integers, one per row of feats")
        if local_feats.device != self.weight.device or labels.device != self.weight.device:
            raise ValueError("feats, labels and the head must be on one device")

        sizes = comm.batch_sizes(local_feats.shape[0], local_feats.device)
        grad_scale = comm.world if self.ddp_compensation else 1
        x = _GatherRows.apply(local_feats, comm, sizes, grad_scale) if comm.active else local_feats
        labels = comm.all_gather_rows(labels.long(), sizes)
        labels = check_label_range(labels, self.num_classes, cfg.ignore_index)

        valid = labels != cfg.ignore_index
        owned = valid & (labels >= self.class_start) & (labels < self.class_end)
        local = torch.where(owned, labels - self.class_start, torch.zeros_like(labels))

        # Target cosine: computed where this rank owns the label, summed over ranks (exactly one non-zero term).  The
        # pre-pass has no graph; the negatives pass returns the same cosine with its gradient, whose weight part it
        # adds into its own dW (no second dense gradient for the W shard).
        target = _loss.target_rows_of(x, self.weight, local, owned, cfg)
        cos_pre = comm.all_reduce(target[2].clone())
        thr = _loss.mask_thresholds(margins.clamp_cos(cos_pre, cfg), valid, cfg)
        scale = _loss.scale_of(cfg.scale, x)

        # Negatives over the local (sampled) classes.
        num_classes = self.num_classes
        if self.sample_rate < 1.0 and self.training:
            index = self._sample(local[owned])
            self.last_sampled_index = index
            w_neg = self.weight.index_select(0, index)
            neg_labels = torch.where(owned, torch.searchsorted(index, local), torch.full_like(local, -1))
            if cfg.label_smoothing > 0:
                count = torch.tensor([float(index.numel())], dtype=thr.dtype, device=thr.device)
                num_classes = comm.all_reduce(count)[0]
        else:
            self.last_sampled_index = None
            w_neg = self.weight
            neg_labels = torch.where(owned, local, torch.full_like(local, -1))
        scale_neg = scale
        if isinstance(scale, torch.Tensor) and scale.requires_grad and comm.active:
            scale_neg = _SumGradOverRanks.apply(scale, comm)
        chosen = _loss.select_backend(x, w_neg, cfg, None, self.backend)
        if not chosen.fused:
            raise ValueError(f"backend {chosen.name!r} materialises B x C and cannot run class-parallel; use 'auto' "
                             "or a fused backend (e.g. 'chunked')")
        lse_part, zsum_part, cos_part = _loss.negatives_pass(chosen, x, w_neg, None, neg_labels, thr, scale_neg, cfg,
                                                             target)
        cos_y = _KnownSum.apply(cos_part, cos_pre)  # the same values as the pre-pass's all-reduced cosine
        z_y, _ = _loss.target_logits(margins.clamp_cos(cos_y, cfg), cfg, x)
        lse_neg = _MergeLSE.apply(lse_part, comm)
        nll = _loss.negatives_nll(lse_neg, z_y)
        lse = zsum = None
        if cfg.label_smoothing > 0:
            lse, zsum = z_y + nll, _AllReduceSum.apply(zsum_part, comm).to(z_y.dtype) + z_y
        return _loss.finish(nll, lse, zsum, valid, num_classes, cfg)

    # ------------------------------------------------------------------------------------------------- checkpoints
    def _extra_entries(self) -> dict:
        return {"t": self.t.detach().clone()} if hasattr(self, "t") else {}

    def full_state_dict(self, rank0_only: bool = True, cpu: bool = True) -> Optional[dict]:
        """{"weight": the full (num_classes, D) W, ("t")} gathered from every rank: on rank 0 only (other ranks get
        None) or, with ``rank0_only=False``, on every rank.  A collective: call it on every rank."""
        comm = _Comm(self.process_group)
        w = self.weight.detach()
        sizes = shard_sizes(self.num_classes, comm.world)
        if not comm.active:
            full = w.clone()
        elif rank0_only:
            most = max(sizes)
            mine = torch.cat([w, w.new_zeros(most - w.shape[0], w.shape[1])]).contiguous()
            dst = dist.get_global_rank(self.process_group, 0) if self.process_group is not None else 0
            parts = [torch.empty_like(mine) for _ in range(comm.world)] if comm.rank == 0 else None
            dist.gather(mine, parts, dst=dst, group=self.process_group)
            if comm.rank != 0:
                return None
            full = torch.cat([p[:n] for p, n in zip(parts, sizes)])
        else:
            full = comm.all_gather_rows(w, sizes)
        out = {"weight": full.cpu() if cpu else full}
        out.update({k: (v.cpu() if cpu else v) for k, v in self._extra_entries().items()})
        return out

    def load_full_state_dict(self, state) -> None:
        """Load this rank's slice of a full W: a (num_classes, D) tensor or a dict with ``weight`` (and ``t``)."""
        w = _shard_weight(state)
        if tuple(w.shape) != (self.num_classes, self.embedding_size):
            raise ValueError(f"full weight must be ({self.num_classes}, {self.embedding_size}), got {tuple(w.shape)}")
        with torch.no_grad():
            self.weight.copy_(w[self.class_start:self.class_end])
        self._load_extra(state)

    def reshard(self, checkpoint) -> None:
        """Load a checkpoint made with any world size: a list of per-rank shards (state dicts or tensors, in rank
        order, contiguous class ranges) or the full W (tensor or dict).  Only this rank's rows are copied."""
        if isinstance(checkpoint, (list, tuple)):
            weights = [_shard_weight(s) for s in checkpoint]
            total = sum(w.shape[0] for w in weights)
            if total != self.num_classes or any(w.shape[1] != self.embedding_size for w in weights):
                raise ValueError(f"shards hold {total} classes of dims {sorted({w.shape[1] for w in weights})}, the "
                                 f"head has {self.num_classes} of dim {self.embedding_size}")
            with torch.no_grad():
                _copy_rows(self.weight, self.class_start, weights)
            if isinstance(checkpoint[0], dict):
                self._load_extra(checkpoint[0])
        else:
            self.load_full_state_dict(checkpoint)

    def load_partial_fc_v2(self, rank_state_dicts: Sequence) -> None:
        """Load insightface PartialFC_V2 per-rank state dicts (``weight`` of shape (num_local, D)) or whole
        arcface_torch checkpoints (``checkpoint_gpu_{rank}.pt``, their ``state_dict_softmax_fc``), saved with any
        world size; the list is in rank order.  Same split rule, so with the same world size each shard maps 1:1
        onto this head's shard."""
        weights = [_shard_weight(s) for s in rank_state_dicts]
        expected = shard_sizes(self.num_classes, len(weights))
        got = [w.shape[0] for w in weights]
        if got != expected:
            raise ValueError(f"PartialFC_V2 shards have {got} rows; {self.num_classes} classes over {len(weights)} "
                             f"ranks split as {expected}")
        self.reshard(weights)

    def _load_extra(self, state) -> None:
        if isinstance(state, dict) and "t" in state and hasattr(self, "t"):
            with torch.no_grad():
                self.t.copy_(state["t"])

    def extra_repr(self) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in self.loss_kwargs.items() if not isinstance(v, torch.Tensor))
        return (f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, rank={self.rank}/"
                f"{self.world_size}, classes=[{self.class_start}, {self.class_end}), sample_rate={self.sample_rate}"
                + (f", {opts}" if opts else ""))
