"""One engine for the whole CMLR family (cmlr.txt, Algorithm 1 and eqs. 5-10, 115).

An inner step is described by three choices (see family.py for each optimizer's):

- ``direction``: where the unit perturbation v_hat comes from
    "grad"      fresh g0 = grad L(w) each step (SAM, FR, LR, CLR);
    "momentum"  the momentum vector v of eq. 10/115, carried across steps (CMLR, FMLR, ML-SAM);
    "lagged"    v from the previous step's probes with beta = 0 (CR at the cost of Table 8).
- ``scheme``: which gradients are probed and how they combine into d
    "forward"       g0 = grad L(w), g+ = grad L(w + rho v_hat); d = (1 - lam/rho) g0 + lam/rho g+ (eq. 6)
    "central"       g+ and g- = grad L(w - rho v_hat);       d = (rho+lam)/2rho g+ + (rho-lam)/2rho g- (eq. 9)
    "central_base"  g0, g+, g-;                               d = g0 + lam/2rho (g+ - g-)           (eq. 8)
- ``lookahead``: whether the K inner steps run inside the Lookahead outer loop (Algorithm 1, line 18).

The momentum update (eq. 115; eq. 10 is gamma = 0.5) uses the two probes of the scheme:
"central": v <- beta_k v_hat + (1 - beta_k)(gamma g+/||g+|| + (1 - gamma) g-/||g-||);
"forward" (FMLR): the same with g0 in the place of g- (our reading: the paper gives no
formula for FMLR's v; this averages the normalised gradients of both of its probes, the
forward-difference analogue of eq. 10). beta_k = beta_s + (beta_e - beta_s) k/(K-1).
The momentum term is beta_k * v_hat (Algorithm 1, line 16), not beta_k * v as eqs. 10/115
print it: with v_0 = g_0 un-normalised, beta_k * v would let the first gradient's scale
dominate; line 16 keeps every term of the average on the unit sphere.

Norms are global: ||v|| (and ||g+||, ||g-||) is taken over all parameters of all param
groups (one vector, as in the paper), and a norm is used as ||x|| + norm_eps so that zero
gradients never give NaN. rho and lam may differ per param group (each group's slice of
v_hat is scaled by its own rho, and its d uses its own rho and lam). Keys that shape the
cycle (k, alpha, beta_start, beta_end, gamma, init_v, norm_eps, backend, base,
reset_base_state) are read from param_groups[0].

Parameters without a gradient: a parameter whose .grad is None after *every* probe of a
step is left untouched (no base step, no weight decay, state unchanged; as torch.optim
does). A parameter whose .grad is None after *some* probes is treated, in every probe, as
having a zero gradient there (same rule for g0, g+ and g-).

Non-finite values: after each probe the loss (if given) and every gradient are checked;
a NaN/Inf skips the whole update: the weights are restored bit for bit, no state changes
(counters aside: ``num_skipped`` grows, ``num_evals`` counts the evaluations actually
done), a RuntimeWarning is issued and the remaining probes of that step are not requested.

Every element-wise pass goes through lookahead_ext.ops, so the backend (reference, cpp,
cuda, triton) is swappable. The engine is a generator of probes: ``step(closure)`` drives
it with a closure, ``probes()`` lets a training loop drive it call by call.

Passes per step. For float32/float64 params the exact fast weights w are backed up into
scratch "masters" fused with the first perturbed probe write
(``ops.perturb_(params, params, v, s, backup=masters)``); an unperturbed g0 probe first
needs no write at all; the base step reads w from the masters and writes the new w into
the params only (``write_masters=False``), and the Lookahead sync runs on the params.
bfloat16/float16 params keep persistent float32 masters in the state (mixed-precision
master weights); the parameter is always cast(master). Each probe's gradients are read
once for the NaN/Inf check and their squared norm together (``ops.nonfinite_(...,
sq_norms=True)``); the momentum v's norm for the next step is accumulated by the
combine_step_ that writes v (``v_sq_out``) and reused while every v tensor is the one
written then (same object, same version counter), else recomputed with multi_dot. A CMLR
inner step with fp32 params thus makes 5 passes: perturb+ (with the backup), check g+,
perturb-, check g-, combine (bench/bench_native.py times exactly this sequence).
Per-step host work is kept small for small models: the buckets are cached (rebuilt when
a parameter's identity, requires_grad or storage changes, or a group is added), and on
CPU the few scalars of a step (1/||v||, the v-update coefficients) are Python floats.

Extension points (for new algorithms as ProbeOptimizer subclasses)
------------------------------------------------------------------
A subclass sets ``direction``/``scheme``/``lookahead`` to reuse the family's step, or
overrides ``_probe_and_commit(self, buckets)``, a generator that must ``yield from`` the
probes it wants and finally update the weights. The building blocks:

``grads = yield from self._probe(buckets, index, name, direction=None, sign=0.0, inv_vnorm=None)``
    Puts every bucket's params at ``w + sign * group["rho"] * inv_vnorm * direction``
    (``direction`` a list, per bucket, of tensor lists; ``inv_vnorm`` a 0-d tensor or
    float; no direction = at w), zeroes the grads, yields a :class:`Probe`, then captures
    and returns the gradients (per bucket, a list with None for params without grad),
    counts the evaluation and skips the update on non-finite values. ``index`` 0 is the
    step's first evaluation (its loss is the step's loss).
``self._dense(buckets, grads)``  -> the grads with None replaced by zeros.
``self._global_sq(lists_per_bucket, pairs)`` -> global dot products (``ops.multi_dot``
    per bucket, summed): e.g. ``self._global_sq([[g] for g in dense], [(0, 0)])[0]``.
``self._norm_inv(sq)`` -> 1/(sqrt(sq) + norm_eps): a 0-d device tensor (CUDA, no host
    sync) or a float (CPU).
``self._probe_sq[name]`` -> the global squared norm of probe ``name``'s gradients, from
    its fused non-finite check (after ``_probe`` returns; zero-filled grads add nothing):
    a Python float for float32 gradients on the CPU (read with the NaN/Inf flag), else a
    0-d tensor; ``_norm_inv`` takes either.
``kept, filled = self._gather(buckets, {"g0": g0, "g+": gp, ...})``
    Drops params without a gradient in every probe (restoring them to w) and zero-fills
    the rest; call it inside ``torch.no_grad()`` before the base step.
``self._base_step(bucket, grads, coefs, v, v_coefs, backend)``
    ``ops.combine_step_`` over one bucket: d = c0*g0 + c+*g+ + c-*g- (``grads`` and
    ``coefs`` 3-tuples, a None list for an unused gradient), the torch SGD/AdamW step
    with d (base state created/advanced per parameter), optional v update
    (``v_coefs = (bv, a0, a+, a-)``, see ops.combine_step_). Records d for
    ``track_cosine``.
``self._state_buffer(p, name, st=None)`` -> a persistent per-parameter float buffer in
    ``self.state[p]`` (saved by state_dict), created as zeros (``st``: ``self.state[p]``
    if the caller holds it).
``self._finish(buckets, k)`` -> end of an applied inner step (pass all the step's
    buckets): counters, cycle position and, for ``lookahead`` optimizers, the slow-weight
    sync after the K-th step. Must be called once, at the end, by an overriding
    ``_probe_and_commit``.

Worked examples: ``OneProbeSGD`` and ``TwoAscentSAM`` in tests/test_optim_api.py (SAM
rebuilt from these blocks matches ``SAM`` bit for bit)::

    def _probe_and_commit(self, buckets):
        g0 = yield from self._probe(buckets, 0, "g0")
        with torch.no_grad():
            dense = self._dense(buckets, g0)
            inv = self._norm_inv(self._global_sq([[d] for d in dense], [(0, 0)])[0])
        gp = yield from self._probe(buckets, 1, "g+", dense, +1.0, inv)
        with torch.no_grad():
            kept, filled = self._gather(buckets, {"g0": g0, "g+": gp})
            for b, g in zip(kept, filled["g+"]):
                self._base_step(b, (None, g, None), (0.0, 1.0, 0.0), None, None, self._backend())
            self._finish(buckets)

Diagnostics: ``track_cosine=True`` records, after every applied step, the cosine between
this step's combined direction d and the previous one's (raw value, in
``opt.cosine_history``; the previous d lives in the state as "prev_d").
"""
from __future__ import annotations

import math
import warnings
from typing import Iterator, Optional

import torch
from torch import Tensor
from torch.optim import Optimizer

from .. import ops
from ..ops.base_step import ADAMW, BASES, SGD, BaseStep
from ..ops.reference import linear_combination
from ._buckets import Bucket, make_buckets, param_signature, state_dtype, trainable
from ._grad_mode import no_grad as _no_grad
from ._slow import SlowWeightsMixin, init_slow

DIRECTIONS = ("grad", "momentum", "lagged")
SCHEMES = ("forward", "central", "central_base")
_ENGINE_KEY = "lookahead_ext"
_BASE_STATE = ("momentum_buffer", "exp_avg", "exp_avg_sq", "step")


class Probe:
    """One gradient evaluation requested by the optimizer.

    ``name`` is "g0" (at w), "g+" (at w + rho v_hat) or "g-" (at w - rho v_hat). When the
    loop body runs, the parameters already hold the probe point and their .grad is None.
    Set ``probe.loss`` to the loss tensor (optional) so that a non-finite loss skips the
    update and ``optimizer.last_loss`` reports the first probe's loss.
    """

    __slots__ = ("index", "name", "loss")

    def __init__(self, index: int, name: str):
        self.index, self.name, self.loss = index, name, None

    def __repr__(self) -> str:
        return f"Probe({self.index}, {self.name!r})"


class _Skip(Exception):
    pass


def _check_range(name, value, lo, hi, lo_open=False, hi_open=False):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    bad = (math.isnan(value) or value < lo or value > hi or (lo_open and value == lo)
           or (hi_open and value == hi))
    if bad:
        lb, rb = "(" if lo_open else "[", ")" if hi_open else "]"
        raise ValueError(f"{name} must be in {lb}{lo}, {hi}{rb}, got {value}")


def _finite_loss(loss) -> bool:
    if isinstance(loss, Tensor):
        return bool(torch.isfinite(loss.detach()).all())
    if isinstance(loss, (int, float)):
        return math.isfinite(loss)
    return True


class ProbeOptimizer(SlowWeightsMixin, Optimizer):
    """Base class of every optimizer of the family (see module docstring).

    Subclasses fix ``direction``, ``scheme`` and ``lookahead`` and choose defaults, or
    override ``_probe_and_commit`` (see "Extension points" in the module docstring).

    Base-step keywords follow torch: ``base="sgd"``: lr, momentum, dampening, nesterov,
    weight_decay (default 0) as torch.optim.SGD; ``base="adamw"``: lr, betas, eps,
    weight_decay (default 1e-2, torch.optim.AdamW's) as torch.optim.AdamW (amsgrad=False).
    ``track_cosine``: record cosine(d_k, d_{k-1}) in ``cosine_history`` (off by default).
    ``max_grad_norm``: clip every probe's gradient by its own global norm (over all
    groups, unscaled under a GradScaler) as torch.nn.utils.clip_grad_norm_ would, before
    it enters the step; None (default) does not clip. ``last_grad_norm`` reports the
    largest pre-clip norm of the step's probes. The gradient handed back in ``.grad``
    after the step is the last probe's, unclipped.
    """

    direction = "momentum"
    scheme = "central"
    lookahead = True

    # keys read from param_groups[0] only: they shape the cycle, not a group's step
    _GLOBAL_KEYS = ("k", "alpha", "beta_start", "beta_end", "gamma", "init_v", "norm_eps",
                    "backend", "reset_base_state", "base", "max_grad_norm")

    def __init__(self, params, lr: float = 1e-3, base: str = SGD, momentum: float = 0.0,
                 dampening: float = 0.0, nesterov: bool = False,
                 weight_decay: Optional[float] = None,
                 betas: tuple = (0.9, 0.999), eps: float = 1e-8, rho: float = 0.05,
                 lam: float = 0.1, k: int = 10, alpha: float = 0.9, beta_start: float = 0.9,
                 beta_end: float = 0.99, gamma: float = 0.5, init_v: str = "grad",
                 norm_eps: float = 1e-12, backend: str = "auto", reset_base_state: bool = False,
                 track_cosine: bool = False, max_grad_norm: Optional[float] = None):
        if weight_decay is None:  # the base optimizer's torch default
            weight_decay = 1e-2 if base == ADAMW else 0.0
        defaults = dict(lr=lr, base=base, momentum=momentum, dampening=dampening,
                        nesterov=nesterov, weight_decay=weight_decay, betas=tuple(betas), eps=eps,
                        rho=rho, lam=lam, k=k, alpha=alpha, beta_start=beta_start,
                        beta_end=beta_end, gamma=gamma, init_v=init_v, norm_eps=norm_eps,
                        backend=backend, reset_base_state=reset_base_state,
                        max_grad_norm=max_grad_norm)
        self._validate(defaults)
        if base == SGD:  # torch's OneCycleLR/CyclicLR cycle "betas", not "momentum", if present
            del defaults["betas"]
        super().__init__(params, defaults)
        for g in self.param_groups:
            self._validate(g)
            for p in g["params"]:
                if p.is_complex() or not p.is_floating_point():
                    raise TypeError(f"{type(self).__name__} supports real floating-point "
                                    f"parameters only, got {p.dtype}")
        self._engine = dict(k=0, steps=0, cycles=0, evals=0, skipped=0, v_ready=False)
        self._scratch: dict = {}
        self._plan: Optional[tuple] = None  # (signature, buckets): see _step_buckets
        self._missing = False
        self._probe_sq: dict = {}
        self._clip: dict = {}  # probe name -> clip factor < 1 (max_grad_norm): see _clip_probe
        self._grad_norms: list = []
        self._last_norms: Optional[list] = None  # see last_grad_norm
        self._v_sq: Optional[tuple] = None  # (||v||^2, [(v tensor, version)]): see _v_norm_sq
        self._slow: dict = {}
        self.last_loss = None
        self.track_cosine = bool(track_cosine)
        self.cosine_history: list[float] = []
        self._dirs: Optional[list] = None
        if self.lookahead:
            init_slow(trainable(self.param_groups), self._slow)

    # ------------------------------------------------------------------ validation
    def _validate(self, g: dict) -> None:
        if g["base"] not in BASES:
            raise ValueError(f"base must be one of {BASES}, got {g['base']!r}")
        if g["backend"] not in ops.BACKENDS:
            raise ValueError(f"backend must be one of {ops.BACKENDS}, got {g['backend']!r}")
        if g["init_v"] not in ("grad", "carry"):
            raise ValueError(f"init_v must be 'grad' or 'carry', got {g['init_v']!r}")
        if isinstance(g["k"], bool) or not isinstance(g["k"], int) or g["k"] < 1:
            raise ValueError(f"k must be an integer >= 1, got {g['k']!r}")
        lr = g["lr"]
        if isinstance(lr, Tensor):
            if lr.numel() != 1:
                raise ValueError("lr as a Tensor must have one element")
            lr = float(lr)
        _check_range("lr", lr, 0.0, math.inf)
        _check_range("rho", g["rho"], 0.0, math.inf, lo_open=True)
        _check_range("lam", g["lam"], 0.0, math.inf)
        _check_range("alpha", g["alpha"], 0.0, 1.0, lo_open=True)
        _check_range("beta_start", g["beta_start"], 0.0, 1.0)
        _check_range("beta_end", g["beta_end"], 0.0, 1.0)
        _check_range("gamma", g["gamma"], 0.0, 1.0)
        _check_range("momentum", g["momentum"], 0.0, 1.0, hi_open=True)
        _check_range("dampening", g["dampening"], 0.0, 1.0)
        _check_range("weight_decay", g["weight_decay"], 0.0, math.inf)
        _check_range("eps", g["eps"], 0.0, math.inf, lo_open=True)
        _check_range("norm_eps", g["norm_eps"], 0.0, math.inf, lo_open=True)
        if "betas" in g:  # base="sgd" groups carry none (see __init__)
            if len(tuple(g["betas"])) != 2:
                raise ValueError(f"betas must be a pair, got {g['betas']!r}")
            b1, b2 = g["betas"]
            _check_range("betas[0]", b1, 0.0, 1.0, hi_open=True)
            _check_range("betas[1]", b2, 0.0, 1.0, hi_open=True)
        if g.get("max_grad_norm") is not None:
            _check_range("max_grad_norm", g["max_grad_norm"], 0.0, math.inf, lo_open=True)
        if g["nesterov"] and (g["momentum"] <= 0 or g["dampening"] != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        if hasattr(self, "_engine"):
            self._validate(self.param_groups[-1])
            if self.lookahead:
                init_slow(trainable([self.param_groups[-1]]), self._slow)

    # ------------------------------------------------------------------ properties
    def _glob(self, key):
        return self.param_groups[0][key]

    def _glob_opt(self, key):
        """A global key that state dicts saved before it existed do not carry."""
        return self.param_groups[0].get(key)

    def _lam(self, group: dict) -> float:
        """The regularisation strength of a group (SAM and ML-SAM tie it to rho)."""
        return group["lam"]

    @property
    def num_evals(self) -> int:
        """Forward/backward passes (gradient evaluations) performed so far."""
        return self._engine["evals"]

    @property
    def num_steps(self) -> int:
        """Inner steps applied (skipped steps excluded)."""
        return self._engine["steps"]

    @property
    def num_skipped(self) -> int:
        """Updates skipped because a loss or gradient was not finite."""
        return self._engine["skipped"]

    @property
    def last_grad_norm(self) -> Optional[float]:
        """The largest global gradient norm among the last step's probes, unscaled (under a
        GradScaler) and before clipping: max_grad_norm clipped that step iff it exceeds
        max_grad_norm. NaN for a skipped step, None before the first step."""
        norms = self._last_norms
        if norms is None:
            return None
        return max(float(n) for n in norms) if norms else math.nan

    @property
    def cycle_position(self) -> int:
        """Index k of the next inner step within the current Lookahead cycle."""
        return self._engine["k"]

    def beta_k(self, k: Optional[int] = None) -> float:
        """beta_k = beta_s + (beta_e - beta_s) k/(K-1) (Algorithm 1, line 15; beta_s if K = 1)."""
        k = self._engine["k"] if k is None else k
        K, bs, be = self._glob("k"), self._glob("beta_start"), self._glob("beta_end")
        if self.direction == "lagged":
            return 0.0
        if not self.lookahead or K == 1:
            return bs
        return bs + (be - bs) * k / (K - 1)

    def evals_per_update(self) -> int:
        """Gradient evaluations of one update as in Table 8 (a whole cycle for lookahead
        ones; CMLR with init_v="carry" and CR need one more on their very first step)."""
        K = self._glob("k") if self.lookahead else 1
        per = {"forward": 2, "central": 2, "central_base": 3}[self.scheme]
        extra = 1 if (self.direction == "momentum" and self.scheme == "central"
                      and self._glob("init_v") == "grad") else 0
        return per * K + extra

    # ------------------------------------------------------------------ the step
    def step(self, closure=None):
        """Perform one inner step. ``closure`` computes the loss at the current parameters,
        calls backward() and returns the loss; the optimizer sets the parameters to each
        probe point and zeroes the grads before each call. Returns the loss of the first
        evaluation."""
        if closure is None:
            raise RuntimeError(
                f"{type(self).__name__}.step() needs a closure: it evaluates the gradient at "
                "several points per step. Pass `closure` (computes the loss, calls backward(), "
                "returns the loss), or drive the step call by call: "
                "`for probe in opt.probes(): loss = compute(); loss.backward(); probe.loss = loss`.")
        gen = self.probes()
        try:
            for probe in gen:
                with torch.enable_grad():
                    probe.loss = closure()
        finally:
            gen.close()
        return self.last_loss

    def probes(self) -> Iterator[Probe]:
        """Call-by-call API: iterate, and in each iteration compute the loss at the current
        parameters and call backward() (several backward() calls accumulate, as usual, e.g.
        for gradient accumulation over micro-batches). Optionally set ``probe.loss``.

        The update is applied when the loop ends. Breaking out early (or an exception in
        the loop body) abandons the step and restores the weights exactly.
        """
        return self._update()

    def _update(self) -> Iterator[Probe]:
        self.last_loss = None
        self._missing = False  # set by _probe: some parameter had no gradient in some probe
        self._probe_sq: dict = {}  # set by _probe: global ||g||^2 of each probe's gradients
        self._clip, self._grad_norms = {}, []  # set by _probe: see _clip_probe
        self._dirs = [] if self.track_cosine else None
        buckets = self._step_buckets()
        committed = False
        try:
            yield from self._probe_and_commit(buckets)
            committed = True
        except _Skip:
            committed = True  # weights already restored
            self._dirs = None
            self._grad_norms = []
        finally:
            if not committed:
                with torch.no_grad():
                    self._restore(buckets)
        if self._dirs is not None:
            with torch.no_grad():
                self._record_cosine()
        self._dirs = None
        if committed:
            self._last_norms = self._grad_norms
        self._opt_called = True  # lets torch lr schedulers know a step happened

    # -- building blocks (see "Extension points") ----------------------------
    def _step_buckets(self) -> list[Bucket]:
        """This step's buckets, rebuilt only when the parameters changed (param_signature).
        Building buckets costs more than the fused ops themselves on small models;
        load_state_dict drops the plan."""
        groups = self.param_groups
        sig = param_signature(groups)
        plan = self._plan
        if plan is None or plan[0] != sig:
            with torch.no_grad():
                plan = self._plan = (sig, make_buckets(groups, self.state, self._scratch))
        for b in plan[1]:
            b.synced, b.perturbed = b.low_precision, False
        return plan[1]

    def _restore(self, buckets) -> None:
        """Put the params back at w (a no-op for buckets never perturbed this step)."""
        for b in buckets:
            if b.params and b.perturbed:
                torch._foreach_copy_(b.params, b.masters)
                b.perturbed = False

    def _ensure_synced(self, buckets) -> None:
        """Make the masters hold w (for buckets whose fused backup has not happened)."""
        for b in buckets:
            if b.params and not b.synced:
                if b.perturbed:  # cannot happen: perturbing syncs first
                    raise RuntimeError("internal error: perturbed before backup")
                torch._foreach_copy_(b.masters, b.params)
                b.synced = True

    def _skip(self, buckets, why: str):
        with torch.no_grad():
            self._restore(buckets)
            for b in buckets:
                for p in b.params:
                    p.grad = None
        self._engine["skipped"] += 1
        warnings.warn(f"{type(self).__name__}: skipped the update ({why}); weights and "
                      f"optimizer state are unchanged (skipped so far: {self._engine['skipped']}).",
                      RuntimeWarning, stacklevel=4)
        raise _Skip()

    def _backend(self) -> str:
        return self._glob("backend")

    def _norm_inv(self, sq):
        """1 / (||x|| + norm_eps) from a squared norm (a 0-d tensor, or a float: CPU).
        CUDA: a 0-d device tensor (no host sync). CPU: a Python float, computed in double
        precision: there is no device to wait for, and each 0-d tensor op costs
        microseconds, which on a small model is more than the fused passes themselves.
        Every scalar derived from it (the probe scale, the v-update coefficients) then
        stays a host float as well."""
        if getattr(self, "norm_hook", None) is not None:  # prod hook: sum over shards (FSDP2)
            sq = self.norm_hook(torch.tensor(sq, dtype=torch.float32) if isinstance(sq, float) else sq)
        if isinstance(sq, float) or sq.device.type == "cpu":
            return 1.0 / (math.sqrt(float(sq)) + self._glob("norm_eps"))
        return 1.0 / (sq.sqrt() + self._glob("norm_eps"))

    def _global_sq(self, lists_per_bucket, pairs) -> Tensor:
        """Global dot products over buckets: lists_per_bucket[bi] is the list of tensor
        lists of bucket bi (as for ops.multi_dot); one multi_dot call per bucket (each on
        one device and dtype), summed in float64 if any bucket is float64, else float32."""
        parts = [ops.multi_dot(lists, pairs, backend=self._backend())
                 for lists in lists_per_bucket if lists and lists[0]]
        return self._sum_parts(parts, len(pairs))

    @staticmethod
    def _sum_parts(parts: list, n: int) -> Tensor:
        """Sum per-bucket results (1-D, n entries) in a fixed order, in float64 if any part
        is float64, on the first part's device; zeros when there is none."""
        if not parts:
            return torch.zeros(n)
        if len(parts) == 1:
            return parts[0]
        dt = torch.float64 if any(x.dtype == torch.float64 for x in parts) else torch.float32
        dev = parts[0].device
        out = parts[0].to(dt)
        for x in parts[1:]:
            out = out + x.to(device=dev, dtype=dt)
        return out

    def _dense(self, buckets, grads):
        """Per-bucket gradient lists with None replaced by zeros (of the parameter's dtype,
        like its gradients, so that every list handed to an op is of one dtype)."""
        return [[g if g is not None else torch.zeros_like(p, memory_format=torch.contiguous_format)
                 for g, p in zip(gl, b.params)] for gl, b in zip(grads, buckets)]

    def _state_buffer(self, p: Tensor, name: str, st: Optional[dict] = None) -> Tensor:
        """``st``: ``self.state[p]`` when the caller has it already (saves the lookup)."""
        if st is None:
            st = self.state[p]
        if name not in st:
            st[name] = torch.zeros_like(p, dtype=state_dtype(p.dtype),
                                        memory_format=torch.contiguous_format)
        return st[name]

    def _probe(self, buckets, index, name, direction=None, sign=0.0, inv_vnorm=None,
               release_direction=False):
        """Put the params at w + sign*rho*inv_vnorm*direction, yield a Probe, capture the grads.
        ``release_direction``: the caller's last use of ``direction``: its per-bucket lists are
        emptied once the probe point is written, before the probe's backward."""
        backend = self._backend()
        with _no_grad():
            for bi, b in enumerate(buckets):
                if not b.params:
                    continue
                if direction is None or sign == 0.0:
                    self._restore([b])
                else:
                    scale = inv_vnorm * (sign * b.group["rho"])
                    if b.synced:
                        ops.perturb_(b.params, b.masters, direction[bi], scale, backend=backend)
                    else:  # fused: masters <- params (w), params <- w + scale*direction
                        ops.perturb_(b.params, b.params, direction[bi], scale,
                                     backup=b.masters, backend=backend)
                        b.synced = True
                    b.perturbed = True
                if not self._probe_sq:  # a probe's capture (it fills _probe_sq) left them None
                    for p in b.params:
                        p.grad = None
        if release_direction:
            for dl in direction:
                dl.clear()
        probe = Probe(index, name)
        yield probe
        self._engine["evals"] += 1
        # prod hook (lookahead_ext.distributed): reduce this probe's grads and loss across ranks
        if getattr(self, "probe_hook", None) is not None:
            self.probe_hook(probe, [p for b in buckets for p in b.params])
        if index == 0:
            self.last_loss = probe.loss
        if probe.loss is not None and not _finite_loss(probe.loss):
            self._skip(buckets, f"non-finite loss at probe {name}")
        grads, checks, missing = [], {}, False
        for b in buckets:
            gl = []
            flat = checks.setdefault(b.kind, [])  # one fused check per (device, dtype)
            for p in b.params:
                g = p.grad
                if g is None:
                    missing = True
                elif g.layout is not torch.strided or g.is_complex():
                    kind = "complex" if g.is_complex() else "sparse"
                    with torch.no_grad():
                        self._restore(buckets)
                    raise RuntimeError(f"{type(self).__name__} does not support {kind} "
                                       f"gradients (parameter of shape {tuple(p.shape)})")
                else:
                    flat.append(g)
                gl.append(g)
                p.grad = None  # keep this probe's gradient; the next probe starts from zero
            grads.append(gl)
        self._missing = self._missing or missing
        # prod hook (lookahead_ext.amp): a GradScaler's 1/scale, unscaled in the fused check
        inv_scale = self.inv_grad_scale() if getattr(self, "inv_grad_scale", None) else None
        # one read per gradient: NaN/Inf flag and the squared norm (eq. 115 and the SAM-type
        # directions need ||g||), per (device, dtype)
        parts = []
        for flat in checks.values():
            if not flat:
                continue
            res = ops.nonfinite_([flat], inv_scale, sq_norms=True, backend=backend)
            if res.device.type == "cpu":  # one host read of [flag, ||g||^2] (see _norm_inv)
                flag, sq = res.tolist()
                parts.append((res, sq if res.dtype == torch.float32 else None))
            else:  # reading the flag syncs; the norm stays on the device
                flag = res[0].item()
                parts.append((res, None))
            if flag:
                self._skip(buckets, f"non-finite gradient at probe {name}")
        if len(parts) == 1 and parts[0][1] is not None:  # the usual CPU case: a float
            self._probe_sq[name] = parts[0][1]
        else:
            self._probe_sq[name] = self._sum_parts([res[1:] for res, _ in parts], 1)[0]
        self._clip_probe(name, grads)
        return grads

    def _clip_probe(self, name, grads) -> None:
        """Record probe ``name``'s global gradient norm (unscaled, before clipping) and, under
        ``max_grad_norm``, clip it by torch.nn.utils.clip_grad_norm_'s factor
        min(1, max_grad_norm / (norm + 1e-6)). The family's own step applies the factor as
        the coefficient of that gradient in d (no extra pass: its direction and v update
        use normalised gradients, which clipping leaves unchanged); a subclass overriding
        ``_probe_and_commit`` gets the gradients scaled in place (one pass) instead."""
        sq = self._probe_sq[name]
        if getattr(self, "norm_hook", None) is not None:  # sum over shards (FSDP2)
            sq = self.norm_hook(torch.tensor(sq, dtype=torch.float32) if isinstance(sq, float) else sq)
        norm = math.sqrt(sq) if isinstance(sq, float) else sq.sqrt()
        self._grad_norms.append(norm)
        max_norm = self._glob_opt("max_grad_norm")
        if not max_norm:
            return
        c = max_norm / (float(norm) + 1e-6)  # a host read of the norm on CUDA
        if c >= 1.0:
            return
        if type(self)._probe_and_commit is ProbeOptimizer._probe_and_commit:
            self._clip[name] = c
        else:
            with _no_grad():
                torch._foreach_mul_([g for gl in grads for g in gl if g is not None], c)
            self._probe_sq[name] = self._probe_sq[name] * (c * c)

    @staticmethod
    def _keep_masks(buckets, probes: dict) -> list[list[bool]]:
        """Per bucket, per parameter: True if it has a gradient in at least one probe."""
        return [[any(probes[n][bi][i] is not None for n in probes) for i in range(len(b.params))]
                for bi, b in enumerate(buckets)]

    def _gather(self, buckets, probes: dict, kept=None):
        """Drop params without a gradient in every probe (restored to w, left untouched) and
        zero-fill missing gradients of the others. Returns (kept buckets, {name: dense grads}).
        ``kept``: the keep masks if already computed."""
        self._ensure_synced(buckets)
        if not self._missing:  # every parameter has a gradient in every probe (the usual case)
            return buckets, dict(probes)
        names = list(probes)
        kept = self._keep_masks(buckets, probes) if kept is None else kept
        self._restore([b.select([not x for x in keep]) for b, keep in zip(buckets, kept)])
        sel = [b.select(keep) for b, keep in zip(buckets, kept)]
        filled = {n: self._dense(sel, [[g for g, kk in zip(gl, keep) if kk]
                                       for gl, keep in zip(probes[n], kept)])
                  for n in names}
        return sel, filled

    def _probe_and_commit(self, buckets):
        eng = self._engine
        K = self._glob("k") if self.lookahead else 1
        k = eng["k"]
        momentum_like = self.direction in ("momentum", "lagged")
        need_v_init = momentum_like and (not eng["v_ready"] or (
            self.direction == "momentum" and self._glob("init_v") == "grad" and k == 0))
        need_g0 = self.scheme in ("forward", "central_base") or self.direction == "grad" or need_v_init

        probes: dict[str, list] = {}
        idx = 0
        if need_g0:
            probes["g0"] = yield from self._probe(buckets, idx, "g0")
            idx += 1
        # the perturbation direction v (per bucket) and 1/||v||
        with _no_grad():
            if self.direction == "grad" or need_v_init:
                vdir = self._dense(buckets, probes["g0"])
                sq_v = self._probe_sq["g0"]  # from g0's fused check (zero-filled grads add 0)
            else:
                vdir = [[self._v(p) for p in b.params] for b in buckets]
                sq_v = self._v_norm_sq(vdir)
            inv_v = self._norm_inv(sq_v)
        # SAM-type steps (d = g+ exactly, no momentum): g0 only gives the direction. Keep
        # which parameters had a gradient and free its tensors before g+'s backward.
        g0_dead = (self.direction == "grad" and self.scheme == "forward"
                   and all(self._lam(b.group) == b.group["rho"] for b in buckets))
        if g0_dead:
            probes["g0"] = [[None if g is None else True for g in gl] for gl in probes["g0"]]
        probes["g+"] = yield from self._probe(buckets, idx, "g+", vdir, +1.0, inv_v,
                                              release_direction=g0_dead)
        if self.scheme != "forward":
            probes["g-"] = yield from self._probe(buckets, idx + 1, "g-", vdir, -1.0, inv_v)
        with _no_grad():
            self._commit(buckets, probes, vdir, inv_v, need_v_init, k, K)

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

    def _commit(self, buckets, probes, vdir, inv_v, need_v_init, k, K):
        backend = self._backend()
        all_buckets = buckets
        if self._missing:
            keep_masks = self._keep_masks(buckets, probes)
            vdir = [[t for t, kk in zip(vl, keep) if kk] for vl, keep in zip(vdir, keep_masks)]
        else:
            keep_masks = None
        buckets, filled = self._gather(buckets, probes, keep_masks)

        # global norms of the two probe gradients that enter the v update (eq. 115)
        momentum_like = self.direction in ("momentum", "lagged")
        if momentum_like:
            first, other = ("g+", "g0") if self.scheme == "forward" else ("g+", "g-")
            # the norms come from the probes' fused checks (zero-filled grads add nothing)
            inv_first = self._norm_inv(self._probe_sq[first])
            inv_other = self._norm_inv(self._probe_sq[other])
            v_sq = self._v_sq_accumulator(buckets)
            beta, gamma = self.beta_k(k), self._glob("gamma")
            a_first = (1.0 - beta) * gamma * inv_first
            a_other = (1.0 - beta) * (1.0 - gamma) * inv_other
            if isinstance(a_first, Tensor):  # device scalars (CUDA): no host sync
                zero = torch.zeros_like(a_first)
                bv = beta * inv_v.to(device=a_first.device, dtype=a_first.dtype)
            else:  # host floats (CPU, see _norm_inv)
                zero, bv = 0.0, beta * inv_v

        written_v: list = []  # the v tensors combine_step_ rewrites (see _v_norm_sq)
        for bi, b in enumerate(buckets):
            if not b.params:
                continue
            rho, lam = b.group["rho"], self._lam(b.group)
            g0, gp, gm = (filled[n][bi] if n in filled else None for n in ("g0", "g+", "g-"))
            if self.scheme == "forward":      # eq. 6
                grads, coefs = (g0, gp, None), (1.0 - lam / rho, lam / rho, 0.0)
            elif self.scheme == "central":    # eq. 9
                grads, coefs = (None, gp, gm), (0.0, (rho + lam) / (2 * rho), (rho - lam) / (2 * rho))
            else:                             # eq. 8
                grads, coefs = (g0, gp, gm), (1.0, lam / (2 * rho), -lam / (2 * rho))
            if self._clip:  # max_grad_norm: each clipped probe's factor (see _clip_probe)
                coefs = tuple(c * self._clip.get(n, 1.0) for c, n in zip(coefs, ("g0", "g+", "g-")))
            if not momentum_like:  # a zero coefficient's gradient is not read (SAM's g0 is freed)
                grads = tuple(None if c == 0.0 else gr for gr, c in zip(grads, coefs))
            v = v_coefs = None
            if momentum_like:
                v = [self._v(p) for p in b.params]
                written_v.extend(v)
                if need_v_init:               # Algorithm 1, line 4: v_0 = g_0
                    torch._foreach_copy_(v, vdir[bi])
                dev = v[0].device
                on = (lambda c: c.to(dev)) if isinstance(bv, Tensor) else (lambda c: c)  # noqa: E731
                if self.scheme == "forward":  # FMLR: g0 plays the part of g-
                    v_coefs = (on(bv), on(a_other), on(a_first), on(zero))
                else:
                    v_coefs = (on(bv), on(zero), on(a_first), on(a_other))
            self._base_step(b, grads, coefs, v, v_coefs, backend,
                            v_sq_out=v_sq if momentum_like else None)

        # hand the last probe's gradient back in .grad, as after a normal backward()
        last = list(probes)[-1]
        for bi, b in enumerate(buckets):
            for p, gr in zip(b.params, filled[last][bi]):
                p.grad = gr if gr.dtype == p.dtype else gr.to(p.dtype)
        if momentum_like:
            self._engine["v_ready"] = True
            if v_sq is not None:  # every v was rewritten by this step: ||v||^2 for the next
                self._v_sq = (v_sq[0], [(t, t._version) for t in written_v])
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
        return torch.zeros(1, dtype=torch.float32, device=next(iter(kinds))[0])

    def _finish(self, buckets, k: Optional[int] = None) -> None:
        """Bookkeeping at the end of an applied inner step, then the Lookahead sync after
        the K-th one (slow <- slow + alpha(fast - slow), fast <- slow). ``buckets``: all
        buckets of the step (params without gradients too: they are synced as well)."""
        eng = self._engine
        k = eng["k"] if k is None else k
        for b in buckets:
            b.perturbed = False
        eng["steps"] += 1
        eng["k"] = k + 1
        if not self.lookahead:
            eng["k"] = 0
        elif eng["k"] >= self._glob("k"):
            self._sync_buckets(buckets)

    def _base_step(self, b: Bucket, grads, coefs, v, v_coefs, backend, v_sq_out=None) -> None:
        """Group the bucket by base-state age (torch semantics are per parameter) and apply.
        fp32/fp64 buckets write the new weights to the params only (their masters are
        scratch, refreshed by the next step's first perturbation), so the bucket's masters
        no longer hold w afterwards. ``v_sq_out``: see ops.combine_step_."""
        g = b.group
        kind = self._glob("base")
        self._ensure_synced([b])
        states = [self.state[p] for p in b.params]
        if kind == ADAMW:
            keys = [st.get("step", 0) + 1 for st in states]
        else:
            mom = g["momentum"] != 0.0
            keys = [mom and "momentum_buffer" not in st for st in states]
        if keys.count(keys[0]) == len(keys):  # one age (the usual case): the whole bucket
            subsets = [(keys[0], None)]
        else:
            sub: dict = {}
            for i, key in enumerate(keys):
                sub.setdefault(key, []).append(i)
            subsets = list(sub.items())
        betas = g.get("betas", (0.9, 0.999))  # base="sgd" groups carry none
        for key, idx in subsets:
            sel = (lambda lst: lst) if idx is None else \
                (lambda lst: None if lst is None else [lst[i] for i in idx])  # noqa: E731
            params, pstates = sel(b.params), sel(states)
            base = BaseStep(kind=kind, lr=float(g["lr"]), weight_decay=g["weight_decay"],
                            momentum=g["momentum"], dampening=g["dampening"],
                            nesterov=g["nesterov"], first=bool(key) if kind == SGD else False,
                            beta1=betas[0], beta2=betas[1], eps=g["eps"],
                            step=key if kind == ADAMW else 1)
            state = {name: [self._state_buffer(p, name, st) for p, st in zip(params, pstates)]
                     for name in base.state_names()}
            sgrads = tuple(sel(x) for x in grads)
            if self._dirs is not None:
                self._record_direction(params, sgrads, coefs)
            ops.combine_step_(params, sel(b.masters), sgrads, coefs, base, state, sel(v), v_coefs,
                              v_sq_out=v_sq_out, write_masters=b.low_precision, backend=backend)
            if kind == ADAMW:
                for st in pstates:
                    st["step"] = key
        if not b.low_precision:
            b.synced = False

    # ------------------------------------------------------------------ diagnostics
    def _record_direction(self, params, grads, coefs) -> None:
        """track_cosine: keep d = sum c_i g_i of these params for the end of the step."""
        d = linear_combination(list(zip(coefs, grads)), params, state_dtype(params[0].dtype))
        self._dirs.append((params, d))

    def _record_cosine(self) -> None:
        if not self._dirs:
            return
        have_prev = all("prev_d" in self.state[p] for params, _ in self._dirs for p in params)
        if have_prev:
            sq = self._global_sq([[d, [self.state[p]["prev_d"] for p in params]]
                                  for params, d in self._dirs], [(0, 1), (0, 0), (1, 1)])
            dot, n0, n1 = (float(x) for x in sq)
            den = math.sqrt(n0) * math.sqrt(n1)
            self.cosine_history.append(dot / den if den > 0 else 0.0)
        for params, d in self._dirs:
            for p, x in zip(params, d):
                self.state[p]["prev_d"] = x
    # ------------------------------------------------------------------ lookahead
    def _sync_buckets(self, buckets) -> None:
        eng = self._engine
        alpha = self._glob("alpha")
        for b in buckets:
            if not b.params:
                continue
            slow = [self._slow[p] for p in b.params]
            if b.low_precision:  # the fp32 masters are the fast weights; params = cast(slow)
                ops.lookahead_sync_(slow, b.masters, alpha, params=b.params, backend=self._backend())
            else:  # fp32/fp64: the params hold w between steps (the masters are scratch)
                ops.lookahead_sync_(slow, b.params, alpha, backend=self._backend())
        eng["k"] = 0
        eng["cycles"] += 1
        if self._glob("reset_base_state"):
            for p in trainable(self.param_groups):
                for name in _BASE_STATE:
                    self.state[p].pop(name, None)

    def _slow_map(self) -> dict:
        if not self.lookahead:
            raise RuntimeError(f"{type(self).__name__} has no slow weights (not a lookahead optimizer)")
        return self._slow

    @torch.no_grad()
    def _sync_now(self) -> None:
        if not self.lookahead:
            raise RuntimeError(f"{type(self).__name__} has no slow weights (not a lookahead optimizer)")
        self._sync_buckets(self._step_buckets())

    # ------------------------------------------------------------------ state dict
    def state_dict(self) -> dict:
        sd = super().state_dict()
        index = {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        sd[_ENGINE_KEY] = dict(engine=dict(self._engine),
                               slow={index[id(p)]: s.clone() for p, s in self._slow.items()},
                               cosine_history=list(self.cosine_history))
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict; tensors keep their saved dtype (fp32 state of bf16/fp16
        params stays fp32, unlike torch.optim's cast to the parameter dtype)."""
        state_dict = dict(state_dict)
        extra = state_dict.pop(_ENGINE_KEY, None)
        saved_state = state_dict.get("state", {})
        super().load_state_dict({"state": {}, "param_groups": state_dict["param_groups"]})
        params = [p for g in self.param_groups for p in g["params"]]
        self.state.clear()
        self._plan = None  # low-precision masters live in the state

        def move(x, p):
            return x.detach().clone().to(p.device) if isinstance(x, Tensor) else x

        for i, st in saved_state.items():
            p = params[int(i)]
            self.state[p] = {key: move(val, p) for key, val in st.items()}
        if extra is not None:
            self._engine = dict(extra["engine"])
            self._slow = {params[int(i)]: move(s, params[int(i)]) for i, s in extra["slow"].items()}
            self.cosine_history = list(extra.get("cosine_history", []))
        self._scratch = {}
        self._plan = None
