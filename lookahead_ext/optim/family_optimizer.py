"""ProbeOptimizer: Algorithm 1 of cmlr.txt for any probe Scheme and Direction, the common base of the CMLR family."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..ops.base_step import ADAMW, SGD
from ._buckets import state_dtype
from ._grad_mode import no_grad as _no_grad
from .runtime import ProbeRuntime
from .scheme import (CENTRAL, MOMENTUM, PROBE_NAMES, Direction, Scheme, direction_of,
                     scheme_of)


class ProbeOptimizer(ProbeRuntime):
    r"""One inner step of the CMLR family (cmlr.txt, Algorithm 1 and eqs. 5-10, 115) for
    the class's ``scheme`` (:class:`~lookahead_ext.optim.scheme.Scheme`: which probes, d),
    ``direction`` (:class:`~lookahead_ext.optim.scheme.Direction`: where v comes from) and
    ``lookahead`` (whether the K inner steps run inside the Lookahead outer loop, line 18):

    1. v = g0 = grad L(w) for a ``"grad"`` direction, or at the start of a carried v
       (line 4); else the carried v
    2. v_hat = v / (||v|| + norm_eps), the norm over all parameters of all groups (line 6)
    3. the scheme's probes at w and/or w +- rho v_hat (lines 9-10)
    4. d = c0 g0 + c+ g+ + c- g- with the scheme's coefficients of (rho, lam) (eqs. 6, 8, 9)
    5. w <- base optimizer step with d (torch.optim.SGD or AdamW semantics) (line 13)
    6. carried v: v <- beta_k v_hat + (1-beta_k)(gamma a/||a|| + (1-gamma) b/||b||) with
       (a, b) the scheme's ``v_terms`` (eq. 115; eq. 10 is gamma = 0.5), beta_k = beta_s +
       (beta_e - beta_s) k/(K-1) (line 15). The momentum term is beta_k v_hat as in line
       16, not beta_k v as eqs. 10/115 print it (with v_0 = g_0 un-normalised, the first
       gradient's scale would dominate)
    7. after the K-th step: slow <- slow + alpha (fast - slow), fast <- slow (line 18)

    rho and lam may differ per param group (each group's slice of v_hat is scaled by its
    own rho, its d uses its own rho and lam); the keys that shape the cycle (k, alpha,
    beta_start, beta_end, gamma, init_v, norm_eps, backend, base, reset_base_state) are
    read from param_groups[0]. A string ``scheme``/``direction`` class attribute is
    resolved by name (``"forward"``, ``"central"``, ``"central_base"``; ``"grad"``,
    ``"momentum"``, ``"lagged"``).

    Args:
        params: iterable of parameters or dicts defining parameter groups.
        lr: learning rate of the base step (float or 1-element tensor). Default: 1e-3.
        base: base optimizer applied to d, ``"sgd"`` (torch.optim.SGD) or ``"adamw"``
            (torch.optim.AdamW, amsgrad=False). Default: ``"sgd"``.
        momentum: SGD momentum. Default: 0.
        dampening: SGD dampening. Default: 0.
        nesterov: SGD Nesterov momentum. Default: False.
        weight_decay: weight decay of the base step; None = the base's torch default
            (0 for SGD, 1e-2 for AdamW, decoupled). Default: None.
        betas: AdamW's (beta1, beta2). Default: (0.9, 0.999).
        eps: AdamW's epsilon. Default: 1e-8.
        rho: perturbation radius rho. Default: 0.05.
        lam: regularisation strength lambda of d. Default: 0.1.
        k: inner steps K per Lookahead cycle. Default: 10.
        alpha: Lookahead outer step size alpha. Default: 0.9.
        beta_start: beta_s of the v update's schedule. Default: 0.9.
        beta_end: beta_e of the v update's schedule. Default: 0.99.
        gamma: weight of the first v term in eq. 115. Default: 0.5.
        init_v: ``"grad"``: v restarts at g0 = grad L(w) at every cycle start (line 4,
            one extra evaluation); ``"carry"``: v carried across cycles. Default: ``"grad"``.
        norm_eps: epsilon of every norm, ``||x|| + norm_eps``. Default: 1e-12.
        backend: fused-op backend (``"auto"``, ``"reference"``, ``"cpp"``, ``"cuda"``,
            ``"triton"``). Default: ``"auto"``.
        reset_base_state: clear the base optimizer's state at every sync. Default: False.
        track_cosine: record cos(d_k, d_{k-1}) in ``cosine_history``. Default: False.
        beta_schedule: ``"cycle"``: beta_k over each cycle (Algorithm 1, line 15);
            ``"training"``: over ``total_steps`` inner steps, as cmlr.txt's experiments
            section says ("annealed from 0.9 up to 0.99 over the course of training"); see
            :meth:`beta_k` and docs/paper-readings.md. Default: ``"cycle"``.
        total_steps: the number of inner steps T of the training run, for
            ``beta_schedule="training"``. Default: None.
        max_grad_norm: clip every probe's gradient by its own global norm (over all
            groups, unscaled under a GradScaler) as torch.nn.utils.clip_grad_norm_ would,
            before it enters the step; None does not clip. ``last_grad_norm`` reports the
            largest pre-clip norm of the step's probes. The gradient handed back in
            ``.grad`` after the step is the last probe's, unclipped. Default: None.
        device_skip: the device-flag mode (no host read in the step; docs/gpu.md): None =
            on for CUDA parameters unless it costs an evaluation (CMLR and CR evaluate
            g0 = grad L(w) in every step in that mode), True = on, False = off. Default: None.
    """

    direction: Direction = MOMENTUM
    scheme: Scheme = CENTRAL
    lookahead = True

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        cls.scheme = scheme_of(cls.scheme)
        cls.direction = direction_of(cls.direction)

    def __init__(self, params, lr: float = 1e-3, base: str = SGD, momentum: float = 0.0,
                 dampening: float = 0.0, nesterov: bool = False,
                 weight_decay: Optional[float] = None,
                 betas: tuple = (0.9, 0.999), eps: float = 1e-8, rho: float = 0.05,
                 lam: float = 0.1, k: int = 10, alpha: float = 0.9, beta_start: float = 0.9,
                 beta_end: float = 0.99, gamma: float = 0.5, init_v: str = "grad",
                 norm_eps: float = 1e-12, backend: str = "auto", reset_base_state: bool = False,
                 track_cosine: bool = False, beta_schedule: str = "cycle",
                 total_steps: Optional[int] = None, max_grad_norm: Optional[float] = None,
                 device_skip: Optional[bool] = None):
        if weight_decay is None:  # the base optimizer's torch default
            weight_decay = 1e-2 if base == ADAMW else 0.0
        defaults = dict(lr=lr, base=base, momentum=momentum, dampening=dampening,
                        nesterov=nesterov, weight_decay=weight_decay, betas=tuple(betas), eps=eps,
                        rho=rho, lam=lam, k=k, alpha=alpha, beta_start=beta_start,
                        beta_end=beta_end, gamma=gamma, init_v=init_v, norm_eps=norm_eps,
                        backend=backend, reset_base_state=reset_base_state,
                        beta_schedule=beta_schedule, total_steps=total_steps,
                        max_grad_norm=max_grad_norm)
        if base == SGD:  # torch's OneCycleLR/CyclicLR cycle "betas", not "momentum", if present
            self._validate(defaults)  # betas too (a bad one is an error even if unused)
            del defaults["betas"]
        self._v_sq: Optional[tuple] = None  # (||v||^2, [(v tensor, version)]): see _v_norm_sq
        super().__init__(params, defaults, track_cosine=track_cosine, device_skip=device_skip)

    @property
    def _clip_as_coefficient(self) -> bool:  # the family's own step (see _clip_probe)
        return type(self)._probe_and_commit is ProbeOptimizer._probe_and_commit

    # ------------------------------------------------------------------ device-flag mode
    def _device_skip_supported(self) -> bool:
        """The family's own step, except where the probe schedule or the state layout
        depends on the counters in a way the device cannot take: FMLR's ``anchor="g+"``
        (no probe at w from k = 1 on) and ``reset_base_state`` (pops the base state)."""
        g = self.param_groups[0]
        return (type(self)._probe_and_commit is ProbeOptimizer._probe_and_commit
                and g.get("anchor", "g0") != "g+" and not g["reset_base_state"])

    def device_skip_default(self) -> bool:
        """Not for a carried v whose scheme has no probe at w (CMLR, CR): the device-flag
        mode evaluates g0 in every step there (the host cannot know when v restarts)."""
        return self._device_skip_supported() and not (
            self.direction.carried and "g0" not in self.scheme.probes)

    def _need_v_init_on_device(self):
        """Algorithm 1, line 4 as a device bool: v is not formed yet, or a cycle starts
        with init_v="grad"."""
        dev = self._dev
        S, d = dev.scratch, dev.t.device
        need = torch.eq(dev.v_ready, 0, out=S("need_v", torch.bool, d))
        if self.direction.restarts and self._glob("init_v") == "grad":
            need.logical_or_(torch.eq(dev.k, 0, out=S("k0", torch.bool, d)))
        return need

    def _beta_on_device(self):
        """beta_k of the counters on the device (float64, the host formula's operation
        order: bit-identical to :meth:`beta_k`)."""
        dev = self._dev
        K, bs, be = self._glob("k"), self._glob("beta_start"), self._glob("beta_end")
        if self.direction.beta is not None:
            return self.direction.beta
        out = dev.scratch("beta", torch.float64, dev.t.device)  # bs + (be - bs) * x / n, op by op
        if self.param_groups[0].get("beta_schedule", "cycle") == "training":
            T = self._glob("total_steps")
            if T == 1:
                return bs
            return torch.clamp(dev.steps, max=T - 1, out=out).mul_(be - bs).div_(T - 1).add_(bs)
        if not self.lookahead or K == 1:
            return bs
        return torch.mul(dev.k, be - bs, out=out).div_(K - 1).add_(bs)

    def _choose_direction(self, buckets, g0, fresh):
        """Device-flag mode: v_hat's direction and 1/||v|| where the host cannot tell
        whether v restarts at g0: both candidates, chosen by the device bool ``fresh``.
        Returns (vdir, inv_v, ||v||^2 of the carried v)."""
        dense = self._dense(buckets, g0)
        carried = [b.kept("v", [self._v(p) for p in b.params]) for b in buckets]
        v_sq = self._v_norm_sq(carried)
        S = self._dev.scratch
        inv_v = torch.where(fresh, self._probe_inv("g0"), self._norm_inv(v_sq),
                            out=S("inv_v_chosen", torch.float64, fresh.device))
        # where(fresh, g, v) into persistent buffers like v (the state dtype: float32 for
        # bf16/fp16 params), kept per bucket: no allocation, and their launch plans persist
        vdir = []
        for bi, (b, gl, vl) in enumerate(zip(buckets, dense, carried)):
            bufs = [S(("vdir", bi, i), v.dtype, v.device, v.shape) for i, v in enumerate(vl)]
            for g, v, o in zip(gl, vl, bufs):
                torch.where(fresh, g, v, out=o)
            vdir.append(b.kept("vdir", bufs))
        return vdir, inv_v, v_sq

    # ------------------------------------------------------------------ the scheme's numbers
    def _lam(self, group: dict) -> float:
        """The regularisation strength of a group (SAM and ML-SAM tie it to rho)."""
        return group["lam"]

    def d_coefs(self, group: Optional[dict] = None) -> dict:
        """{probe name: coefficient} of this optimizer's d for a param group (default the
        first): d = sum over the scheme's probes of coefficient * gradient (before the
        base step's weight decay)."""
        g = self.param_groups[0] if group is None else group
        return self.scheme.coef_dict(g["rho"], self._lam(g))

    def beta_k(self, k: Optional[int] = None) -> float:
        """beta_k = beta_s + (beta_e - beta_s) k/(K-1) (Algorithm 1, line 15; beta_s if K = 1
        or no Lookahead; the direction's fixed beta if it has one).
        ``beta_schedule="training"`` (cmlr.txt, experiments: "annealed from 0.9 up to 0.99 over
        the course of training"): beta_s + (beta_e - beta_s) min(t, T-1)/(T-1) with t the
        inner steps applied so far and T = ``total_steps`` (beta_s if T = 1); k is unused."""
        k = self._engine["k"] if k is None else k
        K, bs, be = self._glob("k"), self._glob("beta_start"), self._glob("beta_end")
        if self.direction.beta is not None:
            return self.direction.beta
        if self.param_groups[0].get("beta_schedule", "cycle") == "training":  # .get: older state dicts
            T = self._glob("total_steps")
            return bs if T == 1 else bs + (be - bs) * min(self._engine["steps"], T - 1) / (T - 1)
        if not self.lookahead or K == 1:
            return bs
        return bs + (be - bs) * k / (K - 1)

    def evals_per_update(self) -> int:
        """Gradient evaluations of one update as in Table 8 (a whole cycle for lookahead
        ones; CMLR with init_v="carry" and CR need one more on their very first step)."""
        K = self._glob("k") if self.lookahead else 1
        anchor = "g0" in self.scheme.probes  # else v = g0 costs one more evaluation
        per = self.scheme.evals + (0 if anchor or self.direction.carried else 1)
        extra = 1 if (self.direction.restarts and not anchor
                      and self._glob("init_v") == "grad") else 0
        return per * K + extra

    # ------------------------------------------------------------------ the step
    def _probe_and_commit(self, buckets):
        eng = self._engine
        K = self._glob("k") if self.lookahead else 1
        carried = self.direction.carried
        chosen = self._dev is not None and carried  # device-flag mode: v's restart on the device
        if chosen:
            k = None  # on the device (see _beta_on_device)
            need_v_init = fresh = self._need_v_init_on_device()
            text_anchor = False
        else:
            k = eng["k"]
            need_v_init = carried and (not eng["v_ready"] or (
                self.direction.restarts and self._glob("init_v") == "grad" and k == 0))
            fresh = not carried or need_v_init  # v = g0 this step
            # FMLR's text reading (anchor="g+"): for k >= 1 the anchor is g+ itself, no probe at w
            text_anchor = k >= 1 and self.param_groups[0].get("anchor") == "g+"

        probes: dict[str, list] = {}
        idx = 0
        v_sq_prev = None
        if chosen or fresh or ("g0" in self.scheme.probes and not text_anchor):
            # a g0 that only a restart of v would use counts towards the skip only then
            used = fresh if chosen and "g0" not in self.scheme.probes else None
            probes["g0"] = yield from self._probe(buckets, idx, "g0", used=used)
            idx += 1
        # the perturbation direction v (per bucket) and 1/||v||
        with _no_grad():
            if chosen:
                vdir, inv_v, v_sq_prev = self._choose_direction(buckets, probes["g0"], fresh)
            elif fresh:
                vdir = self._dense(buckets, probes["g0"])
                inv_v = self._probe_inv("g0")  # from g0's fused check (zero-filled grads add 0)
            else:
                vdir = [b.kept("v", [self._v(p) for p in b.params]) for b in buckets]
                inv_v = self._norm_inv(self._v_norm_sq(vdir))
        # SAM-type steps (d = g+ exactly, no momentum): g0 only gives the direction. Keep
        # which parameters had a gradient and free its tensors before g+'s backward.
        g0_dead = (not carried and self.scheme.probes == ("g0", "g+")
                   and all(self.scheme.coefs(b.group["rho"], self._lam(b.group))[0] == 0.0
                           for b in buckets))
        if g0_dead:
            probes["g0"] = [[None if g is None else True for g in gl] for gl in probes["g0"]]
        for name, sign in (("g+", +1.0), ("g-", -1.0)):
            if name in self.scheme.probes:
                probes[name] = yield from self._probe(buckets, idx, name, vdir, sign, inv_v,
                                                      release_direction=g0_dead and name == "g+")
                idx += 1
        with _no_grad():
            self._commit(buckets, probes, vdir, inv_v, need_v_init, k, K, v_sq_prev)

    def _v_norm_sq(self, vdir) -> Tensor:
        """||v||^2 for this step: the value the previous combine_step_ accumulated while
        writing v (v_sq_out), if every v tensor is still the one written then, unmodified
        (same object, same version counter); else a multi_dot pass over v."""
        cached, self._v_sq = self._v_sq, None
        if cached is not None:
            flat = [t for vl in vdir for t in vl]
            seen = cached[1]
            if len(flat) == len(seen) and all(t is u and t._version == ver
                                              for t, (u, ver) in zip(flat, seen)):
                return cached[0]
        return self._global_sq([[vl] for vl in vdir], [(0, 0)])[0]

    def _v(self, p) -> Tensor:
        # a parameter that joined after v was formed has v = 0: no perturbation
        return self._state_buffer(p, "v")

    def _v_update(self, k, inv_v):
        """The scalars of the v update (eq. 115): (bv, a_first, a_other, zero), from the
        global norms of the scheme's two v terms (from the probes' fused checks)."""
        first, other = self.scheme.v_terms
        inv_first = self._probe_inv(first)
        inv_other = self._probe_inv(other)
        gamma = self._glob("gamma")
        if self._dev is not None:  # float64 device scalars; the unused slot stays a float zero
            return self._v_update_on_device(self._beta_on_device(), inv_v, inv_first, inv_other, gamma)
        beta = self.beta_k(k)
        a_first = (1.0 - beta) * gamma * inv_first
        a_other = (1.0 - beta) * (1.0 - gamma) * inv_other
        if isinstance(a_first, Tensor):  # device scalars (CUDA): no host sync
            zero = torch.zeros_like(a_first)
            bv = beta * inv_v.to(device=a_first.device, dtype=a_first.dtype)
        else:  # host floats (CPU, see groups.inv_norm)
            zero, bv = 0.0, beta * inv_v
        return bv, a_first, a_other, zero

    def _v_update_on_device(self, beta, inv_v, inv_first, inv_other, gamma) -> tuple:
        """_v_update's scalars in the device-flag mode, into persistent float64 buffers, op
        by op as the host formulas: beta * inv_v, (1 - beta) * gamma * inv_first,
        (1 - beta) * (1 - gamma) * inv_other."""
        S, d = self._dev.scratch, inv_first.device
        outs = [S(("v_update", i), torch.float64, d) for i in range(3)]
        if isinstance(beta, Tensor):
            torch.mul(beta, inv_v, out=outs[0])
            for o, g, inv in ((outs[1], gamma, inv_first), (outs[2], 1.0 - gamma, inv_other)):
                torch.sub(S.const(1.0, torch.float64, d), beta, out=o).mul_(g).mul_(inv)
        else:
            torch.mul(inv_v, beta, out=outs[0])
            torch.mul(inv_first, (1.0 - beta) * gamma, out=outs[1])
            torch.mul(inv_other, (1.0 - beta) * (1.0 - gamma), out=outs[2])
        return outs[0], outs[1], outs[2], 0.0

    def _commit(self, buckets, probes, vdir, inv_v, need_v_init, k, K, v_sq_prev=None):
        backend = self._backend()
        all_buckets = buckets
        if self._missing:
            keep_masks = self._keep_masks(buckets, probes)
            vdir = [[t for t, kk in zip(vl, keep) if kk] for vl, keep in zip(vdir, keep_masks)]
        else:
            keep_masks = None
        buckets, filled = self._gather(buckets, probes, keep_masks)
        if "g0" in self.scheme.probes and "g0" not in filled:  # anchor="g+": d = g+, v from g+ only
            filled["g0"], self._probe_sq["g0"] = filled["g+"], self._probe_sq["g+"]

        scheme, carried = self.scheme, self.direction.carried
        if carried:
            v_scalars = self._v_update(k, inv_v)
            v_coefs_all = scheme.v_coefs(*v_scalars)
            on_device = isinstance(v_scalars[0], Tensor)
            v_sq = self._v_sq_accumulator(buckets)
            if isinstance(need_v_init, Tensor):  # v <- g0 unless the step is skipped
                S, d = self._dev.scratch, need_v_init.device
                ok = torch.eq(self._dev.found, 0, out=S("ok", torch.bool, d))
                need_v_init = torch.logical_and(need_v_init, ok, out=S("v_init", torch.bool, d))
        # per slot (g0, g+, g-): the probe's dense grads per bucket, if d uses that probe
        g0, gp, gm = (filled[n] if n in scheme.probes else None for n in PROBE_NAMES)
        written_v: list = []  # the v tensors combine_step_ rewrites (see _v_norm_sq)
        for bi, b in enumerate(buckets):
            if not b.params:
                continue
            grads = (g0 and g0[bi], gp and gp[bi], gm and gm[bi])
            coefs = scheme.coefs(b.group["rho"], self._lam(b.group))
            if self._clip:  # max_grad_norm: each clipped probe's factor (see _clip_probe)
                coefs = tuple(c * self._clip.get(n, 1.0) for c, n in zip(coefs, PROBE_NAMES))
            if not carried:  # a zero coefficient's gradient is not read (SAM's g0 is freed)
                grads = tuple(None if c == 0.0 else gr for gr, c in zip(grads, coefs))
            v = v_coefs = None
            if carried:
                v = b.kept("v", [self._v(p) for p in b.params])
                written_v.extend(v)
                if isinstance(need_v_init, Tensor):  # the device chooses (vdir is g0 or v)
                    for d, x in zip(vdir[bi], v):
                        torch.where(need_v_init, d, x, out=x)
                elif need_v_init:               # Algorithm 1, line 4: v_0 = g_0
                    torch._foreach_copy_(v, vdir[bi])
                v_coefs = v_coefs_all
                if on_device:
                    v_coefs = tuple(c.to(v[0].device) if isinstance(c, Tensor) else c
                                    for c in v_coefs)
            self._base_step(b, grads, coefs, v, v_coefs, backend,
                            v_sq_out=v_sq if carried else None)

        # hand the last probe's gradient back in .grad, as after a normal backward()
        last = list(probes)[-1]
        self._hand_back([(b.params, filled[last][bi]) for bi, b in enumerate(buckets)])
        if carried:
            self._engine["v_ready"] = True
            if v_sq is not None:  # every v was rewritten by this step: ||v||^2 for the next
                sq = v_sq[0]
                if self._dev is not None:  # a skipped step left v (and v_sq zero): keep its norm
                    S, d = self._dev.scratch, sq.device
                    skipped = torch.gt(self._dev.found, 0, out=S("skipped", torch.bool, d))
                    sq = torch.where(skipped, v_sq_prev.reshape(()).to(sq.dtype), sq,
                                     out=S("v_sq", sq.dtype, d))
                if sq is not None:
                    self._v_sq = (sq, [(t, t._version) for t in written_v])
        self._finish(all_buckets, k)

    def _v_sq_accumulator(self, buckets) -> Optional[Tensor]:
        """A zeroed float32 [1] for combine_step_'s v_sq_out when the step rewrites every v
        on one device in float32 state (fp64 state keeps its own precision through the
        multi_dot pass, and a dropped parameter keeps an unrewritten v); else None."""
        if self._missing:
            return None
        kinds = {b.kind for b in buckets if b.params}  # (device, dtype) per bucket
        if len({dev for dev, _ in kinds}) != 1 or any(state_dtype(dt) != torch.float32
                                                      for _, dt in kinds):
            return None
        device = next(iter(kinds))[0]
        if self._dev is not None:  # (the previous step's sum was copied: see _commit)
            return self._dev.scratch("v_sq_acc", torch.float32, device, (1,)).zero_()
        return torch.zeros(1, dtype=torch.float32, device=device)
