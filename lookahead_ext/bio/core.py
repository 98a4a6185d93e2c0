"""LookaheadBio: bilevel data-source reweighting with Lookahead on model and data weights.

See the class docstring of :class:`LookaheadBio` for the algorithm, the choices made where
the paper (``lookaheadbio.txt``) is ambiguous, and the memory / compute cost.
"""
from __future__ import annotations

import csv
import json
import os
from dataclasses import replace
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from .. import ops
from ..ops.base_step import ADAMW, SGD, BaseStep
from ..ops.reference import compute_dtype
from ..optim.groups import KindGroups, base_step_, sync_slow_
from ..optim.checkpoint import check_counter, check_like, refuse
from ..optim.validation import BIO_RULES, check_values

__all__ = ["LookaheadBio"]

_MODES = ("reweight", "sample")
_HYPERGRAD = ("shared", "updated")


class _Level:
    """One set of trained tensors (the fast model weights w, the auxiliary copy u, or the
    logits λ) with its fp32 masters (only for low-precision parameters) and its
    base-optimizer state; the fused ops run per (device, dtype) group (optim.groups)."""

    def __init__(self, tensors: list[Tensor], base: BaseStep):
        self.tensors = tensors                    # what the model computes with
        self.masters = [t if t.dtype == compute_dtype(t.dtype) else
                        t.detach().to(compute_dtype(t.dtype)).clone() for t in tensors]
        self.base = base
        self.state = {name: [torch.zeros_like(m) for m in self.masters] for name in base.state_names()}
        self.steps = 0
        self.groups = KindGroups(tensors)

    @torch.no_grad()
    def step_(self, grads: list[Tensor], backend: str) -> None:
        self.steps += 1  # one age for the whole level: SGD's buffers start at step 1
        base = (replace(self.base, step=self.steps) if self.base.kind == ADAMW else
                replace(self.base, first=self.steps == 1))
        base_step_(self.tensors, self.masters, (grads, None, None), (1.0, 0.0, 0.0), base,
                   self.state, backend=backend, groups=self.groups)

    @torch.no_grad()
    def sync_(self, slow: list[Tensor], beta: float, backend: str) -> None:
        """Lookahead step on this level: slow += β(fast − slow), fast ← slow (masters and
        the tensors they are the fp32 copies of)."""
        sync_slow_(slow, self.masters, beta, params=self.tensors, backend=backend,
                   groups=self.groups)

    def state_dict(self) -> dict:
        return {"steps": self.steps,
                "masters": [m.detach().clone() for m in self.masters],
                "tensors": [t.detach().clone() for t in self.tensors],
                "state": {k: [t.clone() for t in v] for k, v in self.state.items()}}

    def check_state_dict(self, owner: str, name: str, sd) -> None:
        """Refuse (checkpoint.refuse) a level state dict of another layout or base step."""
        if not isinstance(sd, dict) or {"steps", "masters", "tensors", "state"} - set(sd):
            refuse(owner, f"the state dict's {name!r} entry is not a LookaheadBio level "
                          "(steps, masters, tensors, state)")
        check_counter(owner, f"{name} steps", sd["steps"], float("inf"))
        check_like(owner, f"{name} tensors", self.tensors, sd["tensors"])
        check_like(owner, f"{name} masters", self.masters, sd["masters"])
        if not isinstance(sd["state"], dict) or set(sd["state"]) != set(self.state):
            got = sorted(sd["state"]) if isinstance(sd["state"], dict) else type(sd["state"]).__name__
            refuse(owner, f"the state dict's {name} optimizer state is {got}, this LookaheadBio's "
                          f"{self.base.kind} step keeps {sorted(self.state)} (another base?)")
        for key, v in self.state.items():
            check_like(owner, f"{name} state {key!r}", v, sd["state"][key])

    @torch.no_grad()
    def load_state_dict(self, sd: dict) -> None:
        """Copy a checked (check_state_dict) level state dict in."""
        self.steps = int(sd["steps"])
        for dst, src in zip(self.tensors, sd["tensors"]):
            dst.copy_(src)
        for dst, src in zip(self.masters, sd["masters"]):
            dst.copy_(src)
        for k, v in self.state.items():
            for dst, src in zip(v, sd["state"][k]):
                dst.copy_(src)


class LookaheadBio:
    r"""Learn sampling weights p = softmax(λ) over m data sources by minimising the
    validation loss (eq. 1), with Lookahead slow/fast weights on both the model weights
    and the data logits (Algorithm 1), on ScaleBiO's penalty reformulation (eq. 2)

        L^α(λ, w, u) = L1(λ, w) + α (L2(λ, w) − L2(λ, u)),
        L2(λ, w)     = Σ_i p_i · ℓ_i(w),   ℓ_i(w) = mean per-example training loss of source i,
        L1(λ, w)     = mean validation loss at w (may depend on λ, see ``l1_uses_weights``).

    One call of :meth:`step` is one inner step of Algorithm 1 (lines 7–10); every ``k``
    calls the slow weights move (lines 11–13), φ_w += β_w(θ_w − φ_w), φ_λ += β_λ(θ_λ − φ_λ),
    and the fast ones restart from them (line 4); u goes through the same cycle as θ_w
    (``u_sync=True``, the default, as the authors' code) or carries on (``u_sync=False``,
    line 14 literally); see choice 9.

    Inner step i (θ = fast weights, which are the model's own parameters for w)::

        u   ← u − η_u ∇_u L2(θ_λ, u)                              (line 8)
        θ_w ← θ_w − η_w [∇_w L1(θ_λ, θ_w) + α ∇_w L2(θ_λ, θ_w)]   (line 9)
        θ_λ ← θ_λ − η_λ [∇_λ L1 + α (∇_λ L2(θ_λ, w') − ∇_λ L2(θ_λ, u'))]   (line 10)

    with "−η ×" replaced by the base optimizer step (SGD as in Algorithm 1, or AdamW as in
    ScaleBiO's code), applied through :func:`lookahead_ext.ops.combine_step_`; the slow
    update uses :func:`lookahead_ext.ops.lookahead_sync_` (fused backends underneath).

    **∇_λ L2 is analytic** (no autograd through the model): with the softmax Jacobian
    J = diag(p) − p pᵀ, ∇_λ L2(λ, x) = J ℓ(x) = p ⊙ (ℓ(x) − pᵀℓ(x)); hence the λ direction
    of line 10 is α · p ⊙ (d − pᵀd) with d = ℓ(w') − ℓ(u') (+ ∇_λ L1 from autograd when L1
    depends on λ).

    Choices where the paper is ambiguous (each is tested in tests/test_bio*.py):

    1. *Where line 10 is evaluated* (``hypergrad``). Algorithm 1 evaluates ∇_λ at the
       updated θ_w^{(i)}, u^{(i)}; ScaleBiO's official code evaluates it at the points
       before the update (θ_w^{(i−1)}, u^{(i−1)}), from the same forward passes that give
       the w and u gradients. ``hypergrad="shared"`` (default) is the latter: 2 forward
       and 2 backward passes per step (over m source batches + the validation batch).
       ``hypergrad="updated"`` is line 10 literally: 2 extra forward passes (no backward,
       under ``no_grad``) at the updated w and u, on the same training batches D_tr^i.
    2. *The u step* (line 8) uses ∇_u L2 without the factor α (as written in Algorithm 1;
       ScaleBiO's code scales it by α, which only matters for SGD: pass ``lr_u = α·lr``
       to reproduce that).
    3. *∇_λ L1 in line 10* (only when L1 depends on λ, ``l1_uses_weights``) comes from
       the backward pass that gives ∇_w L1 (at θ_λ^{(i−1)}, θ_w^{(i−1)}) in both modes: one
       autograd call, no extra backward.
    4. *Optimizer state across syncs* (lines 4 and 12–13): the base-optimizer states
       (momentum / Adam moments, step counts) of w and λ carry on through the reset of the
       fast weights, as in the Lookahead optimizer (Zhang et al. 2019) and this project's
       :class:`lookahead_ext.Lookahead`. u's state carries on too; u itself is reset
       with θ_w by default (choice 9).
    5. *The slow weights start at the initial weights* (line 1–2: θ = φ^{(0)}); with
       β = 1 the sync is an exact copy (slow ← fast), so k = 1, β_w = β_λ = 1 is ScaleBiO
       bit for bit.
    6. *λ's optimizer*: SGD for ``base="sgd"`` (Algorithm 1), Adam (AdamW without weight
       decay) for ``base="adamw"`` (ScaleBiO's code uses one optimizer type for all three);
       override with ``lam_base``.
    7. *Sampling option* (``mode="sample"``): instead of reweighting losses, the caller
       draws each source's batch size from p (:meth:`sample_counts`); the w/u gradients
       use the plain mean over the mixed batch (an unbiased estimate of Σ p_i ℓ_i), and the
       λ direction uses d_i = ℓ_i(w') − ℓ_i(u') for the sources present and d_i = 0 (no
       information) for a source drawn zero times.
    8. *p reported* by :meth:`weights` is softmax(φ_λ), the slow weights (Algorithm 1's
       output); :meth:`fast_weights` gives softmax(θ_λ).

    9. *u and the Lookahead cycle* (line 14, ``u_sync``). Read literally, u carries on
       while θ_w is pulled back to φ_w every k steps, so w lags u systematically and
       d = ℓ(w) − ℓ(u) in line 10 measures that lag (largest on the source that is easiest
       to learn) rather than the pull of L1. Measured on demo 1 (digits, clean 10% vs label
       noise 90%): ``u_sync=False`` ends with p_clean = 0.03, i.e. it up-weights the noisy
       source; ScaleBiO (k = 1) gives 0.997. Default ``u_sync=True``: u goes through the
       same cycle as θ_w (φ_u += β_w(u − φ_u), u ← φ_u, one more copy), the lag is then
       symmetric and cancels in d (p_clean = 0.99). With β_w = 1 both options are identical
       (ScaleBiO). ``u_sync=True`` is what the authors' public code does
       (Onemee-Laboratory/LookaheadBio wraps every optimizer, u's included, in Lookahead
       with k = 5, alpha = 0.5); ``u_sync=False`` is Algorithm 1 as printed.
    10. *The authors' settings* (:attr:`AUTHORS_PRESET`, :meth:`authors_preset`): their
       code's λ optimizer is AdamW with weight decay 0.01, and w and u use weight decay
       5e-4, with k = 5, β = 0.5 on every level and u in the cycle.

    Cost. Memory beyond the model and its gradients, for the N trained parameters: u (N,
    param dtype), φ_w (N, fp32 for low-precision params), φ_u (N, with ``u_sync``), fp32
    masters of w and u for low-precision params (2N), base-optimizer states for w and u
    (SGD: 0, or N each with momentum; AdamW: 2N each). fp32 AdamW: 7N in all; fp32 SGD: 3N.
    Pass ``params`` (e.g. only LoRA / trainable parameters) to bound this.
    Compute per step: forward + backward at u on the m training batches, forward + backward
    at w on the m training batches and the validation batch (one autograd.grad over
    L1 + αL2), + 2 no-grad forwards on the training batches with ``hypergrad="updated"``;
    every k steps one fused sync over φ_w (φ_u) and φ_λ.

    Bad input: a wrong number of source batches, an empty source batch (reweight mode),
    source ids out of range, or per-example losses of the wrong shape raise ValueError
    before anything changes. A non-finite loss or gradient skips the step (nothing changes,
    the row in :meth:`history` has ``skipped=True``) or raises FloatingPointError with
    ``on_nonfinite="raise"``. λ is never written with a non-finite value.

    Args:
        model: any ``nn.Module`` (e.g. a Hugging Face causal LM).
        loss_fn: ``loss_fn(model, batch) -> Tensor[B]`` per-example training losses.
        num_sources: m.
        params: the parameters to train (default: those with ``requires_grad``); others
            are left untouched.
        val_loss_fn: validation loss, per-example or scalar; default ``loss_fn``. With
            ``l1_uses_weights=True`` it is called ``val_loss_fn(model, batch, p)`` with p a
            differentiable softmax(θ_λ), and its λ gradient enters line 10.
        k, beta_w, beta_lam: Lookahead period and slow step sizes (β = 1, k = 1: ScaleBiO).
        alpha: penalty α of eq. 2.
        lr_w, lr_u, lr_lam: η_w, η_u (default η_w), η_λ.
        base: "sgd" or "adamw" (w and u); momentum, weight_decay, betas, eps apply to them.
        lam_base: "sgd" or "adam" for λ (default: see choice 6).
        lam_weight_decay: decoupled weight decay of λ's optimizer (default 0; the
            authors' preset: 0.01).
        lam_init: initial logits (default zeros, uniform p).
        mode: "reweight" (default) or "sample"; hypergrad: "shared" or "updated";
        u_sync: Lookahead cycle on u too (default True, see choice 9).
        backend: backend of the fused ops ("auto", "reference", "cpp", "cuda", "triton").
        source_names: names used in history / plots.
        seed: seed of the generator used by :meth:`sample_counts`.
    """

    #: The authors' settings (choice 10); base="adamw" for w and u is ScaleBiO's optimizer.
    AUTHORS_PRESET = dict(k=5, beta_w=0.5, beta_lam=0.5, u_sync=True, base="adamw",
                          weight_decay=5e-4, lam_base="adam", lam_weight_decay=0.01)

    @classmethod
    def authors_preset(cls, model: nn.Module, loss_fn: Callable, num_sources: int, **kw):
        """A LookaheadBio with :attr:`AUTHORS_PRESET` (keywords in ``kw`` override it)."""
        return cls(model, loss_fn, num_sources, **{**cls.AUTHORS_PRESET, **kw})

    def __init__(self, model: nn.Module, loss_fn: Callable, num_sources: int, *,
                 params: Optional[Sequence[nn.Parameter]] = None,
                 val_loss_fn: Optional[Callable] = None, l1_uses_weights: bool = False,
                 k: int = 5, beta_w: float = 0.5, beta_lam: float = 0.5, alpha: float = 100.0,
                 lr_w: float = 1e-3, lr_u: Optional[float] = None, lr_lam: float = 1e-2,
                 base: str = "sgd", lam_base: Optional[str] = None, lam_weight_decay: float = 0.0,
                 momentum: float = 0.0,
                 weight_decay: float = 0.0, betas: tuple = (0.9, 0.999), eps: float = 1e-8,
                 lam_init: Optional[Sequence[float]] = None, mode: str = "reweight",
                 hypergrad: str = "shared", u_sync: bool = True, on_nonfinite: str = "skip",
                 backend: str = "auto", source_names: Optional[Sequence[str]] = None,
                 seed: int = 0):
        if not isinstance(model, nn.Module):
            raise TypeError("model must be an nn.Module")
        if not isinstance(num_sources, int) or num_sources < 2:
            raise ValueError(f"num_sources must be an integer >= 2, got {num_sources!r}")
        check_values(dict(k=k, beta_w=beta_w, beta_lam=beta_lam, alpha=alpha, lr_w=lr_w, lr_u=lr_u,
                          lr_lam=lr_lam, momentum=momentum, weight_decay=weight_decay, betas=betas,
                          eps=eps, lam_weight_decay=lam_weight_decay, backend=backend), BIO_RULES)
        if base not in (SGD, ADAMW):
            raise ValueError(f"base must be 'sgd' or 'adamw', got {base!r}")
        lam_base = lam_base or ("sgd" if base == SGD else "adam")
        if lam_base not in ("sgd", "adam"):
            raise ValueError(f"lam_base must be 'sgd' or 'adam', got {lam_base!r}")
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        if hypergrad not in _HYPERGRAD:
            raise ValueError(f"hypergrad must be one of {_HYPERGRAD}, got {hypergrad!r}")
        if on_nonfinite not in ("skip", "raise"):
            raise ValueError("on_nonfinite must be 'skip' or 'raise'")
        if source_names is not None and len(source_names) != num_sources:
            raise ValueError(f"source_names has {len(source_names)} names for {num_sources} sources")

        self.model, self.loss_fn = model, loss_fn
        self.val_loss_fn = val_loss_fn or loss_fn
        self.l1_uses_weights = l1_uses_weights
        self.m = num_sources
        self.k, self.beta_w, self.beta_lam, self.alpha = k, float(beta_w), float(beta_lam), float(alpha)
        self.mode, self.hypergrad, self.on_nonfinite, self.backend = mode, hypergrad, on_nonfinite, backend
        self.u_sync = bool(u_sync)
        self.source_names = list(source_names) if source_names else [f"source{i}" for i in range(num_sources)]

        if params is None:
            params = [p for p in model.parameters() if p.requires_grad]
        else:
            params = list(params)
        seen, uniq = set(), []
        for p in params:  # tied weights appear once
            if id(p) not in seen:
                seen.add(id(p))
                uniq.append(p)
        if not uniq:
            raise ValueError("no parameters to train")
        self.params = uniq

        kw = dict(weight_decay=weight_decay, momentum=momentum, beta1=betas[0], beta2=betas[1], eps=eps)
        if base == ADAMW:
            kw.pop("momentum")
        base_w = BaseStep(kind=base, lr=lr_w, **kw)
        base_u = BaseStep(kind=base, lr=lr_w if lr_u is None else lr_u, **kw)
        with torch.no_grad():
            u_tensors = [p.detach().clone() for p in self.params]
        self._w = _Level(self.params, base_w)  # fast θ_w: the model's own parameters
        self._u = _Level(u_tensors, base_u)
        with torch.no_grad():
            self._slow_w = [m.detach().clone() for m in self._w.masters]  # φ_w
            self._slow_u = [m.detach().clone() for m in self._u.masters] if self.u_sync else []

        dev = self.params[0].device
        lam0 = torch.zeros(num_sources, dtype=torch.float32, device=dev)
        if lam_init is not None:
            lam0 = torch.as_tensor(lam_init, dtype=torch.float32, device=dev).clone()
            if lam0.shape != (num_sources,) or not torch.isfinite(lam0).all():
                raise ValueError(f"lam_init must be {num_sources} finite numbers")
        lam_step = (BaseStep(kind=SGD, lr=lr_lam, weight_decay=lam_weight_decay) if lam_base == "sgd" else
                    BaseStep(kind=ADAMW, lr=lr_lam, weight_decay=lam_weight_decay, beta1=betas[0],
                             beta2=betas[1], eps=eps))
        self._lam = _Level([lam0], lam_step)          # fast θ_λ
        self._slow_lam = [lam0.clone()]                # φ_λ
        self._counter = 0                              # position in the Lookahead cycle
        self._step = 0                                 # inner steps taken (not skipped)
        self._calls = 0                                # step() calls, skipped included
        self._history: list[dict] = []
        self._gen = torch.Generator().manual_seed(seed)

    # ------------------------------------------------------------------ weights
    @property
    def lam(self) -> Tensor:
        """Fast logits θ_λ (a view; do not modify)."""
        return self._lam.tensors[0]

    @property
    def slow_lam(self) -> Tensor:
        return self._slow_lam[0]

    def weights(self) -> Tensor:
        """p = softmax(φ_λ), the slow data weights (Algorithm 1's output)."""
        return torch.softmax(self._slow_lam[0].detach(), 0).clone()

    def fast_weights(self) -> Tensor:
        return torch.softmax(self._lam.tensors[0].detach(), 0).clone()

    @property
    def u(self) -> list[Tensor]:
        return self._u.tensors

    @property
    def slow_w(self) -> list[Tensor]:
        return self._slow_w

    @property
    def cycle_position(self) -> int:
        return self._counter

    def sample_counts(self, batch_size: int, fast: bool = True) -> list[int]:
        """mode="sample": how many examples to draw from each source, multinomial with p
        (the fast weights θ_λ by default: they are the ones line 8–9 use)."""
        p = self.fast_weights() if fast else self.weights()
        idx = torch.multinomial(p.cpu().double(), batch_size, replacement=True, generator=self._gen)
        return torch.bincount(idx, minlength=self.m).tolist()

    # ------------------------------------------------------------------ losses
    def _per_source(self, train, source_ids) -> list:
        """Validate the training input; returns [(batch, ids or None)]."""
        if source_ids is not None:
            ids = torch.as_tensor(source_ids)
            if ids.dim() != 1 or ids.numel() == 0:
                raise ValueError("source_ids must be a non-empty 1-D tensor")
            if ids.min() < 0 or ids.max() >= self.m:
                raise ValueError(f"source_ids must lie in [0, {self.m}), got range "
                                 f"[{int(ids.min())}, {int(ids.max())}]")
            counts = torch.bincount(ids, minlength=self.m)
            if self.mode == "reweight" and (counts == 0).any():
                empty = [self.source_names[i] for i in (counts == 0).nonzero().flatten().tolist()]
                raise ValueError(f"empty source batch for {empty}: reweight mode needs at least "
                                 "one example from every source each step")
            return [(train, ids)]
        if not isinstance(train, (list, tuple)):
            raise TypeError("train must be a list of per-source batches (or one batch with source_ids=)")
        if len(train) != self.m:
            raise ValueError(f"expected {self.m} source batches, got {len(train)}")
        for i, b in enumerate(train):
            if b is None or _batch_len(b) == 0:
                if self.mode == "reweight":
                    raise ValueError(f"empty batch for source {i} ({self.source_names[i]}): reweight "
                                     "mode needs at least one example from every source each step")
        return [(b, None) for b in train]

    def _source_losses(self, parts) -> tuple[Tensor, Tensor, Tensor]:
        """Forward the training batches: (per-source mean losses ℓ [m] (0 where a source has
        no example), example counts [m], sum of all per-example losses (0-d))."""
        if len(parts) == 1 and parts[0][1] is not None:
            batch, ids = parts[0]
            losses = self._check_losses(self.loss_fn(self.model, batch), len(ids))
            ids = ids.to(losses.device)
            s = torch.zeros(self.m, dtype=losses.dtype, device=losses.device).index_add(0, ids, losses)
            c = torch.bincount(ids, minlength=self.m).to(losses.dtype)
            return s / c.clamp_min(1), c, losses.sum()
        means, counts, total = [], [], None
        for b, _ in parts:
            if b is None or _batch_len(b) == 0:
                means.append(None)
                counts.append(0)
                continue
            losses = self._check_losses(self.loss_fn(self.model, b), _batch_len(b))
            means.append(losses.mean())
            counts.append(losses.numel())
            total = losses.sum() if total is None else total + losses.sum()
        ref = next(x for x in means if x is not None)
        ell = torch.stack([x if x is not None else ref.new_zeros(()) for x in means])
        return ell, torch.tensor(counts, dtype=ell.dtype, device=ell.device), total

    @staticmethod
    def _check_losses(losses, n) -> Tensor:
        if not isinstance(losses, Tensor) or losses.dim() != 1:
            raise ValueError("loss_fn must return a 1-D tensor of per-example losses, got "
                             f"{type(losses).__name__} of shape {getattr(losses, 'shape', None)}")
        if n is not None and losses.numel() != n:
            raise ValueError(f"loss_fn returned {losses.numel()} losses for a batch of {n}")
        return losses.float() if losses.dtype in (torch.float16, torch.bfloat16) else losses

    def _l2(self, ell: Tensor, counts: Tensor, total: Tensor, p: Tensor) -> Tensor:
        """L2 for the w / u gradient: Σ_i p_i ℓ_i (reweight), or the plain mean over the
        mixed batch (sample mode, whose composition was drawn from p)."""
        if self.mode == "reweight":
            return (p.to(ell.dtype) * ell).sum()
        return total / counts.sum()

    def _val_loss(self, val_batch, p_graph: Optional[Tensor]) -> Tensor:
        out = (self.val_loss_fn(self.model, val_batch, p_graph) if self.l1_uses_weights
               else self.val_loss_fn(self.model, val_batch))
        if not isinstance(out, Tensor):
            raise ValueError("val_loss_fn must return a tensor")
        return out.float().mean() if out.dim() else out.float()

    def _swap_u(self) -> None:
        """Exchange the model's parameter storage with u's (pointer swap, no copy)."""
        for p, u in zip(self.params, self._u.tensors):
            tmp = p.data
            p.data = u.data
            u.data = tmp

    # ------------------------------------------------------------------ step
    def step(self, train, val_batch, source_ids: Optional[Tensor] = None) -> dict:
        """One inner step of Algorithm 1 (lines 7–10) and, every k-th step, the slow update
        (lines 11–13). ``train``: a list of m per-source batches (``loss_fn(model, batch)``
        each), or one batch with ``source_ids`` (LongTensor[B], the source of each example).
        Returns the history row of this step."""
        parts = self._per_source(train, source_ids)
        self._calls += 1
        lam = self._lam.tensors[0]
        p = torch.softmax(lam.detach(), 0)

        # ---- line 8, gradient at u^{(i-1)}: forward + backward of L2(θ_λ, u)
        self._swap_u()
        try:
            ell_u, c_u, t_u = self._source_losses(parts)
            l2_u = self._l2(ell_u, c_u, t_u, p)
            g_u = list(torch.autograd.grad(l2_u, self.params, allow_unused=True))
        finally:
            self._swap_u()
        # ---- line 9 (+ ∇λL1 of line 10): forward + backward of L1 + α L2 at θ_w^{(i-1)}
        lam_req = None
        if self.l1_uses_weights:
            lam_req = lam.detach().clone().requires_grad_(True)
            p_graph = torch.softmax(lam_req, 0)
        else:
            p_graph = None
        ell_w, c_w, t_w = self._source_losses(parts)
        l2_w = self._l2(ell_w, c_w, t_w, p)
        l1 = self._val_loss(val_batch, p_graph)
        wrt = self.params + ([lam_req] if lam_req is not None else [])
        grads = torch.autograd.grad(l1 + self.alpha * l2_w, wrt, allow_unused=True)
        g_w = list(grads[:len(self.params)])
        g_l1_lam = grads[-1] if lam_req is not None else None
        g_u = [g if g is not None else torch.zeros_like(t) for g, t in zip(g_u, self.params)]
        g_w = [g if g is not None else torch.zeros_like(t) for g, t in zip(g_w, self.params)]
        if g_l1_lam is None:
            g_l1_lam = torch.zeros_like(lam)

        row = {"step": self._step, "call": self._calls - 1, "skipped": False,
               "val_loss": float(l1.detach()), "train_loss_w": float(l2_w.detach()),
               "train_loss_u": float(l2_u.detach())}
        scalars = torch.stack([l1.detach(), l2_w.detach(), l2_u.detach()]).float()
        bad = ops.nonfinite_([[scalars, ell_w.detach().float(), ell_u.detach().float(), g_l1_lam.float()]],
                             backend="reference")
        bad = bad + ops.nonfinite_([g_w], backend=self.backend) + ops.nonfinite_([g_u], backend=self.backend)
        if bool(bad > 0):
            return self._skip(row, "non-finite loss or gradient")

        # ---- updates of u (line 8) and θ_w (line 9)
        self._u.step_(g_u, self.backend)
        self._w.step_(g_w, self.backend)

        # ---- line 10
        with torch.no_grad():
            if self.hypergrad == "updated":
                ell_w_new = self._source_losses(parts)[0]
                self._swap_u()
                try:
                    ell_u_new = self._source_losses(parts)[0]
                finally:
                    self._swap_u()
                if not (torch.isfinite(ell_w_new).all() and torch.isfinite(ell_u_new).all()):
                    raise FloatingPointError(
                        "LookaheadBio: non-finite training loss at the updated w or u (hypergrad="
                        "'updated'); w and u were already stepped, λ was left unchanged")
                d = (ell_w_new - ell_u_new).to(lam.dtype)
            else:
                d = (ell_w - ell_u).detach().to(lam.dtype)
            if self.mode == "sample":
                d = torch.where(c_w > 0, d, torch.zeros_like(d))
            g_lam = self.lam_direction(p, d)
            if self.l1_uses_weights:
                g_lam = g_lam + g_l1_lam.to(lam.dtype)
            if not torch.isfinite(g_lam).all():  # cannot happen from finite inputs; guard λ anyway
                raise FloatingPointError("LookaheadBio: non-finite λ gradient")
        self._lam.step_([g_lam], self.backend)

        self._step += 1
        self._counter += 1
        synced = False
        if self._counter >= self.k:
            self.sync()
            synced = True
        row.update(self._row_weights(ell_w.detach(), ell_u.detach()))
        row["synced"] = synced
        self._history.append(row)
        return row

    def lam_direction(self, p: Tensor, d: Tensor) -> Tensor:
        """α (∇_λ L2(λ, w) − ∇_λ L2(λ, u)) = α J d with J = diag(p) − p pᵀ the softmax
        Jacobian and d = ℓ(w) − ℓ(u):  α p ⊙ (d − pᵀ d)."""
        p = p.to(d.dtype)
        g = self.alpha * d  # same rounding as autograd's softmax backward of <p, α d>
        return p * (g - (g * p).sum())

    def _skip(self, row: dict, why: str) -> dict:
        if self.on_nonfinite == "raise":
            raise FloatingPointError(f"LookaheadBio: {why}; nothing was changed")
        row["skipped"] = True
        row["synced"] = False
        row.update(self._row_weights(None, None))
        self._history.append(row)
        return row

    def _row_weights(self, ell_w, ell_u) -> dict:
        out = {}
        pw, pf = self.weights().tolist(), self.fast_weights().tolist()
        for i, n in enumerate(self.source_names):
            out[f"p_{n}"] = pw[i]
            out[f"p_fast_{n}"] = pf[i]
            out[f"loss_w_{n}"] = float(ell_w[i]) if ell_w is not None else float("nan")
            out[f"loss_u_{n}"] = float(ell_u[i]) if ell_u is not None else float("nan")
        return out

    @torch.no_grad()
    def sync(self) -> None:
        """Lookahead outer step on both levels (lines 11–13, then line 4): φ += β(θ − φ),
        θ ← φ; u too with β_w when ``u_sync`` (the default), else u is untouched (line 14).
        Restarts the cycle. β = 1 is an exact copy."""
        self._w.sync_(self._slow_w, self.beta_w, self.backend)
        if self.u_sync:
            self._u.sync_(self._slow_u, self.beta_w, self.backend)
        self._lam.sync_(self._slow_lam, self.beta_lam, self.backend)
        self._counter = 0

    # ------------------------------------------------------------------ history
    def history(self) -> list[dict]:
        """One row per step() call: step, skipped, synced, val_loss, train_loss_w (L2 at w),
        train_loss_u, and per source: p_<name> (slow), p_fast_<name>, loss_w_<name>,
        loss_u_<name> (mean training loss of the source at w / u, before the step)."""
        return [dict(r) for r in self._history]

    def save_history(self, path: str) -> None:
        """Write the history as CSV (``.csv``) or JSON (anything else)."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        rows = self.history()
        if path.endswith(".csv"):
            keys = list(rows[0].keys()) if rows else ["step"]
            with open(path, "w", newline="") as f:
                wr = csv.DictWriter(f, fieldnames=keys)
                wr.writeheader()
                wr.writerows(rows)
        else:
            with open(path, "w") as f:
                json.dump({"source_names": self.source_names, "rows": rows}, f, indent=1)

    def plot_weights(self, path: str, title: Optional[str] = None, fast: bool = True) -> None:
        """Weight curves p_i over steps (as the paper's Figures 1–2): slow weights solid,
        fast weights thin dashed."""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        rows = self.history()
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fig, ax = plt.subplots(figsize=(6, 3.6))
        steps = [r["call"] for r in rows]
        for i, n in enumerate(self.source_names):
            line, = ax.plot(steps, [r[f"p_{n}"] for r in rows], lw=2, label=f"{n} (slow φ)")
            if fast:
                ax.plot(steps, [r[f"p_fast_{n}"] for r in rows], lw=0.8, ls="--",
                        color=line.get_color(), alpha=0.7, label=f"{n} (fast θ)")
        ax.set_xlabel("step")
        ax.set_ylabel("weight p")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        if title:
            ax.set_title(title)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)

    # ------------------------------------------------------------------ state dict
    def state_dict(self) -> dict:
        """w (fast, with masters), u, λ (fast and slow), φ_w, the three optimizer states,
        the cycle position, counters, the sampling generator and the history."""
        return {"w": self._w.state_dict(), "u": self._u.state_dict(), "lam": self._lam.state_dict(),
                "slow_w": [t.clone() for t in self._slow_w], "slow_u": [t.clone() for t in self._slow_u],
                "slow_lam": self._slow_lam[0].clone(),
                "counter": self._counter, "step": self._step, "calls": self._calls,
                "gen": self._gen.get_state(), "history": self.history(),
                "config": {"m": self.m, "k": self.k, "beta_w": self.beta_w, "beta_lam": self.beta_lam,
                           "alpha": self.alpha, "mode": self.mode, "hypergrad": self.hypergrad,
                           "n_params": len(self.params)}}

    @torch.no_grad()
    def load_state_dict(self, sd: dict) -> None:
        """Load a state dict written by ``state_dict()`` of a LookaheadBio with the same
        sources, parameters (shapes), base steps and ``u_sync``; k, beta_w, beta_lam and
        alpha come from it, ``backend`` stays this one's. Checked first (checkpoint.py): a
        refused one raises StateDictError (a ValueError) and changes nothing."""
        owner = "LookaheadBio"
        keys = {"w", "u", "lam", "slow_w", "slow_u", "slow_lam", "counter", "step", "calls",
                "gen", "history", "config"}
        if not isinstance(sd, dict) or keys - set(sd):
            got = sorted(keys - set(sd)) if isinstance(sd, dict) else type(sd).__name__
            refuse(owner, f"not a LookaheadBio state dict (missing {got})")
        cfg = sd["config"]
        if cfg.get("m") != self.m:
            refuse(owner, f"the state dict is for {cfg.get('m')} sources, this LookaheadBio has {self.m}")
        if cfg.get("n_params") != len(self.params):
            refuse(owner, f"the state dict is for {cfg.get('n_params')} parameters, this LookaheadBio "
                          f"trains {len(self.params)}")
        for name, level in (("w", self._w), ("u", self._u), ("lam", self._lam)):
            level.check_state_dict(owner, name, sd[name])
        check_like(owner, "slow_w", self._slow_w, sd["slow_w"])
        if len(sd["slow_u"]) != len(self._slow_u):
            refuse(owner, f"the state dict was written with u_sync={bool(sd['slow_u'])}, this "
                          f"LookaheadBio has u_sync={self.u_sync}")
        check_like(owner, "slow_u", self._slow_u, sd["slow_u"])
        check_like(owner, "slow_lam", self._slow_lam, [sd["slow_lam"]])
        try:  # the constructor's rules (a missing key is None, which they refuse)
            check_values({name: cfg.get(name) for name in ("k", "beta_w", "beta_lam", "alpha")}, BIO_RULES)
        except ValueError as e:
            refuse(owner, f"the state dict's {e}")
        check_counter(owner, "cycle position", sd["counter"], cfg["k"])
        if not isinstance(sd["gen"], Tensor) or sd["gen"].dtype != torch.uint8:
            refuse(owner, "the state dict's sampling generator state is not a uint8 tensor")
        # commit: nothing below raises
        self.k, self.beta_w, self.beta_lam, self.alpha = cfg["k"], cfg["beta_w"], cfg["beta_lam"], cfg["alpha"]
        self._w.load_state_dict(sd["w"])
        self._u.load_state_dict(sd["u"])
        self._lam.load_state_dict(sd["lam"])
        for dst, src in zip(self._slow_w + self._slow_u, list(sd["slow_w"]) + list(sd["slow_u"])):
            dst.copy_(src)
        self._slow_lam[0].copy_(sd["slow_lam"])
        self._counter, self._step, self._calls = sd["counter"], sd["step"], sd["calls"]
        self._gen.set_state(sd["gen"])
        self._history = [dict(r) for r in sd["history"]]


def _batch_len(b) -> int:
    if isinstance(b, Tensor):
        return b.shape[0] if b.dim() else 1
    if isinstance(b, dict):
        return _batch_len(next(iter(b.values()))) if b else 0
    if isinstance(b, (list, tuple)):
        return _batch_len(b[0]) if len(b) else 0
    try:
        return len(b)
    except TypeError:
        return 1
