"""Data-parallel training with the multi-probe step: DDP (:class:`DistributedProbes`),
FSDP2 (:class:`FSDPProbes`, :func:`local_shards`) and LookaheadBio (:class:`DistributedBio`).

Plain DDP all-reduces the gradient inside every ``backward()``. A probe optimizer needs
exactly one averaged gradient per probe (the perturbation direction of the next probe is
computed from it, so it must be identical on every rank), and the loss of each probe must
agree across ranks too, or one rank skips a non-finite step while another goes on and the
job hangs. ``DistributedProbes`` does this:

- every forward and backward pass of a step runs under ``model.no_sync()`` (DDP decides
  at forward time whether the next backward synchronises, so the forward pass is inside
  it too): micro-batches accumulate locally, DDP's own reducer stays idle;
- a probe hook (``optimizer.register_probe_hook``) runs after each probe: it all-reduces
  the probe's gradients, the probe's loss and a has-gradient flag per parameter in ONE
  collective on one flat buffer, then divides by the world size; the optimizer's
  non-finite check then sees
  the same numbers on every rank, so all ranks skip or commit together;
- BatchNorm buffers follow DDP's ``broadcast_buffers``: rank 0's are broadcast at the
  start of every step (``sync_buffers()``), since DDP skips that under ``no_sync``;
- the perturbation is computed from the averaged gradients (or from the momentum v built
  from them), so it is identical on all ranks, and so are the weights after each step.

The result equals the single-process run on the concatenated batch (each rank's loss is a
mean over its equal-sized shard). A parameter without a gradient on any rank keeps
``grad=None`` (the optimizer leaves it untouched); one with a gradient on some ranks only
gets the average with zeros elsewhere, as DDP does.

Usage::

    model = DDP(net)
    opt = lookahead_ext.CMLR(model.parameters(), lr=0.1)
    dp = DistributedProbes(opt, model)
    loss = dp.step(closure)                      # or: for probe in dp.probes(): ...
    loss = dp.step(closure, scaler=scaler)       # with torch.amp.GradScaler

Checkpoints: every rank holds the same optimizer state, so rank 0 saves
``opt.state_dict()`` (mid-cycle too: the Lookahead position, v and the slow weights are
in it) and every rank loads it after the new process group is up.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
import torch.distributed as dist

__all__ = ["DistributedProbes", "all_reduce_probe_grads", "FSDPProbes", "local_shards",
           "DistributedBio"]


def all_reduce_probe_grads(params, loss=None, group=None, average: bool = True):
    """All-reduce the ``.grad`` of ``params``, a has-gradient flag per parameter and
    ``loss`` in one collective on one flat buffer (in place). Returns the reduced loss
    (the mean over ranks with ``average``), or None when ``loss`` is None.

    The buffer has the same layout on every rank (a parameter without a gradient sends
    zeros), so ranks whose sets of used parameters differ still line up.

    Args:
        params: the parameters, in the same order on every rank.
        loss: the local loss (a tensor) to reduce along, or None.
        group: the process group (None: the default group).
        average: divide the sums by the world size (True) or keep sums (False).
    """
    world = dist.get_world_size(group)
    grads = [p.grad for p in params]
    wide = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
    device = params[0].device if params else torch.device("cpu")
    pieces = [g.detach().reshape(-1).to(wide) if g is not None
              else torch.zeros(p.numel(), dtype=wide, device=device)
              for p, g in zip(params, grads)]
    has_loss = loss is not None and torch.is_tensor(loss)
    tail = [float(g is not None) for g in grads] + [float(has_loss)]
    pieces.append(torch.tensor(tail, dtype=wide, device=device))
    pieces.append(loss.detach().reshape(1).to(device=device, dtype=wide) if has_loss
                  else torch.zeros(1, dtype=wide, device=device))
    buf = torch.cat(pieces)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
    counts = buf[-len(tail) - 1:-1].tolist()       # per parameter: ranks with a gradient
    if average and world > 1:
        buf.div_(world)
    off = 0
    with torch.no_grad():
        for p, g, n in zip(params, grads, counts[:-1]):
            chunk = buf[off:off + p.numel()].view(p.shape)
            off += p.numel()
            if n == 0:
                p.grad = None                      # unused on every rank: left untouched
            elif g is not None:
                g.copy_(chunk)
            else:
                p.grad = chunk.to(p.dtype).clone()
    if not has_loss:
        return None
    if counts[-1] < world:                         # some rank set no loss: keep the local one
        return loss
    return buf[-1].to(loss.dtype)


class DistributedProbes:
    """Runs a probe optimizer's steps data-parallel (see the module docstring).

    Args:
        optimizer: a probe optimizer (CMLR, SAM, ... or a :class:`lookahead_ext.Lookahead`
            around one); a probe hook is registered on it (``remove()`` unregisters it).
        model: the DDP-wrapped model (anything with ``no_sync()``), or None for a model whose
            gradients are not synchronised by a wrapper.
        group: the process group (default: the world).
        average: all-reduce each probe's gradients and loss as the mean over ranks (True) or
            their sum (False).
    """

    def __init__(self, optimizer, model=None, group=None, average: bool = True):
        if not hasattr(optimizer, "register_probe_hook"):
            raise TypeError("DistributedProbes needs a probe optimizer (CMLR, SAM, ...); "
                            "torch optimizers and Lookahead work with DDP as they are")
        self.optimizer, self.model, self.group, self.average = optimizer, model, group, average
        self.num_all_reduces = 0
        self._handle = optimizer.register_probe_hook(self._hook)

    def _hook(self, optimizer, probe, params):
        self.num_all_reduces += 1
        reduced = all_reduce_probe_grads(params, probe.loss, self.group, self.average)
        if reduced is not None:
            probe.loss = reduced

    def remove(self) -> None:
        """Unregister the probe hook (the optimizer then runs single-process again)."""
        self._handle.remove()

    def _no_sync(self):
        ns = getattr(self.model, "no_sync", None)
        return ns() if ns is not None else contextlib.nullcontext()

    def sync_buffers(self) -> None:
        """Broadcast the model's buffers (BatchNorm running stats) from rank 0, one
        collective per dtype. DDP does this before each synchronised forward; under
        ``no_sync`` it does not, so ``probes()``/``step()`` call this at the start of
        every step when the model is a DDP with ``broadcast_buffers=True``."""
        module = getattr(self.model, "module", self.model)
        if module is None:
            return
        by_dtype: dict = {}
        for b in module.buffers():
            by_dtype.setdefault((b.dtype, b.device), []).append(b)
        src = dist.get_global_rank(self.group, 0) if self.group is not None else 0
        for bufs in by_dtype.values():
            flat = torch.cat([b.detach().reshape(-1) for b in bufs])
            dist.broadcast(flat, src=src, group=self.group)
            off = 0
            with torch.no_grad():
                for b in bufs:
                    b.copy_(flat[off:off + b.numel()].view_as(b))
                    off += b.numel()

    def probes(self, scaler=None) -> Iterator:
        """Call-by-call API: as ``optimizer.probes()`` (or ``lookahead_ext.amp.probes`` when
        a GradScaler is given), every pass under ``no_sync``."""
        if scaler is not None:
            from . import amp
            it = amp.probes(self.optimizer, scaler)
        else:
            it = self.optimizer.probes()
        if getattr(self.model, "broadcast_buffers", False):
            self.sync_buffers()
        with self._no_sync():
            yield from it

    def step(self, closure: Callable, scaler=None):
        """``optimizer.step(closure)`` data-parallel; returns the first probe's loss averaged
        over the ranks. With ``scaler``, the closure calls ``scaler.scale(loss).backward()``
        (then call ``scaler.update()``)."""
        for probe in self.probes(scaler):
            with torch.enable_grad():
                probe.loss = closure()
        return self.optimizer.last_loss


class DistributedBio:
    """Data-parallel :class:`lookahead_ext.bio.LookaheadBio` (applied in place; ``remove()``
    undoes it). Each rank passes its own shard of every source batch and of the validation
    batch (equal sizes on all ranks) to ``bio.step(train_list, val_batch)``.

    LookaheadBio takes its gradients with ``torch.autograd.grad`` on the plain module (do
    not wrap the model in DDP), so this works without touching LookaheadBio:

    - a gradient hook on every trained parameter averages ∇w and ∇u across ranks (the
      parameter object is shared by the w and u passes);
    - ``loss_fn`` / ``val_loss_fn`` are wrapped so that every per-source mean loss ℓ_i and
      the validation loss are the means over all ranks (the per-example losses are shifted
      by a detached constant: gradients unchanged). The λ direction α p ⊙ (d − pᵀd) is
      linear in d = ℓ(w) − ℓ(u), so it is the λ-gradient averaged across ranks; with
      ``l1_uses_weights`` the gradient flowing into p is averaged too;
    - a non-finite loss on any rank is non-finite on all, so all ranks skip together;
    - at install, the parameters, u, the slow weights and λ are broadcast from rank 0.

    Only the list-of-source-batches form of ``step`` is supported (not ``source_ids=``).
    Collectives: one all-reduce per parameter per backward (not coalesced) and one scalar
    all-reduce per source batch forward.

    Args:
        bio: the :class:`lookahead_ext.LookaheadBio` to run data-parallel (its model not
            wrapped in DDP).
        group: the process group (default: the world).
    """

    def __init__(self, bio, group=None):
        self.bio, self.group = bio, group
        self.world = dist.get_world_size(group)
        self._loss_fn, self._val_loss_fn = bio.loss_fn, bio.val_loss_fn
        bio.loss_fn = self._wrap(bio.loss_fn, val=False)
        bio.val_loss_fn = self._wrap(bio.val_loss_fn, val=True)
        self._handles = [p.register_hook(self._avg) for p in bio.params]
        src = dist.get_global_rank(group, 0) if group is not None else 0
        with torch.no_grad():
            for t in (list(bio.params) + list(bio.u) + list(bio.slow_w) + list(bio._slow_u)
                      + [bio._lam.tensors[0], bio._slow_lam[0]] + list(bio._w.masters)
                      + list(bio._u.masters)):
                dist.broadcast(t.data, src=src, group=group)

    def _avg(self, g):
        g = g.clone()
        dist.all_reduce(g, group=self.group)
        return g.div_(self.world)

    def _global_mean(self, x):
        m = x.detach().float().mean().reshape(1)
        dist.all_reduce(m, group=self.group)
        return (m / self.world)[0]

    def _wrap(self, fn, val):
        def wrapped(model, batch, *rest):
            if rest and torch.is_tensor(rest[0]) and rest[0].requires_grad:
                rest[0].register_hook(self._avg)   # p = softmax(λ): average ∂L1/∂p
            out = fn(model, batch, *rest)
            if out.dim() == 0:
                return out + (self._global_mean(out) - out.detach())
            return out + (self._global_mean(out) - out.detach().float().mean()).to(out.dtype)
        return wrapped

    def remove(self) -> None:
        self.bio.loss_fn, self.bio.val_loss_fn = self._loss_fn, self._val_loss_fn
        for h in self._handles:
            h.remove()
        self._handles = []


def local_shards(model) -> list:
    """FSDP2 (``fully_shard``): the local shards of the model's DTensor parameters, as plain
    tensors that the probe optimizer can own (build it on these: ``CMLR(local_shards(m))``).
    They share storage with FSDP2's sharded parameters, so the optimizer's in-place writes
    are what the next all-gather sends.

    Args:
        model: a module whose parameters ``fully_shard`` has made DTensors (plain
            parameters are passed through as they are). Frozen parameters are left out.
    """
    out = []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        loc = p._local_tensor if hasattr(p, "_local_tensor") else p
        loc.requires_grad_(True)
        out.append(loc)
    return out


class FSDPProbes:
    """A probe optimizer on FSDP2-sharded parameters (see :func:`local_shards`).

    After each probe FSDP2 has reduce-scattered (averaged) the gradient into each
    parameter's sharded ``.grad`` DTensor; a probe hook moves the local
    shard into the local tensor's ``.grad`` and all-reduces, in one collective, the probe's
    loss and a non-finite flag (a shard can hold an inf that other ranks do not see: the
    flag makes every rank skip together). A norm reducer (``register_norm_reducer``)
    all-reduces the squared norms computed on the local shards, so ||v||, ||g+||, ||g-||
    are global. ``remove()`` unregisters both.
    Only the ``step``/``probes`` of this object go through FSDP2 correctly.

    Args:
        optimizer: a probe optimizer built over :func:`local_shards` of the model.
        model: the ``fully_shard``-ed model.
        group: the process group (default: the world).
    """

    def __init__(self, optimizer, model, group=None):
        self.optimizer, self.model, self.group = optimizer, model, group
        self.world = dist.get_world_size(group)
        self._dt = {}
        for p in model.parameters():
            loc = p._local_tensor if hasattr(p, "_local_tensor") else p
            self._dt[id(loc)] = p
        self._handles = [optimizer.register_probe_hook(self._probe_hook),
                         optimizer.register_norm_reducer(self._norm_reducer)]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()

    def _norm_reducer(self, optimizer, sq):
        sq = sq.clone()
        dist.all_reduce(sq, group=self.group)
        return sq

    def _probe_hook(self, optimizer, probe, params):
        flags = []
        for loc in params:
            dt = self._dt.get(id(loc))
            if dt is None or dt is loc:
                continue
            g = dt.grad
            dt.grad = None
            loc.grad = None if g is None else (g._local_tensor if hasattr(g, "_local_tensor") else g)
            if loc.grad is not None and loc.grad.numel():
                flags.append(torch.logical_not(torch.isfinite(loc.grad).all()))
        bad = torch.stack(flags).any().float() if flags else torch.zeros(())
        loss = probe.loss
        has = loss is not None and torch.is_tensor(loss)
        buf = torch.stack([bad, loss.detach().float().reshape(()) if has else torch.zeros(())])
        dist.all_reduce(buf, group=self.group)
        if has:
            probe.loss = (buf[1] / self.world).to(loss.dtype)
        if float(buf[0]) > 0:
            probe.loss = torch.tensor(float("nan"))     # every rank skips the step

    def probes(self):
        return self.optimizer.probes()

    def step(self, closure):
        return self.optimizer.step(closure)
