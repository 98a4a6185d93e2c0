"""Part 4a: the noisy quadratic model (cmlr.txt §4.2, App. D; Zhang et al. 2019, §3).

Model: L(x) = 1/2 (x - c)^T H (x - c), c ~ N(0, Sigma), H and Sigma diagonal; each inner
step samples a fresh c (one "minibatch"), shared by all probes of that step. We simulate
B independent chains at once and measure, after burn-in, the variance across chains of the
slow weights at the sync points (averaged over the measurement cycles), per coordinate.

Closed forms (per coordinate, h = H_ii, s2 = Sigma_ii the *variance* of c_i, a = 1 - eta h):

    SGD:            V*    = eta^2 h^2 s2 / (1 - a^2)                               (A_2^-1 eta^2 H^2 Sigma)
    Lookahead(SGD): V_LA* = alpha^2 A_2k / (alpha^2 A_2k + 2 alpha (1-alpha) A_k) V*,  A_j = 1 - a^j

Derivation (why Sigma, not Sigma^2): one step is x' = a x + eta h c, so
Var(x') = a^2 Var(x) + eta^2 h^2 Var(c) = a^2 Var(x) + eta^2 h^2 s2; the noise enters through
Var(c) = Sigma. The fixed point is V* = eta^2 h^2 Sigma / (1 - a^2). App. D's eq. 75-79 have
Sigma (right); eq. 69 (Theorem D.1's statement) has Sigma^2, which is right only if Sigma
denoted the standard deviation. The run below uses s2 != 1 and prints both.

LR on the NQM with the squared-norm regulariser L + lam/2 ||grad L||^2 (§4): the regularised
loss has Hessian H' = H + lam H^2, so V_LR* is the formula above with h' = h + lam h^2. Our
LR uses an *unnormalised* perturbation (an option of this bench code, the library keeps
eq. 6's normalised one): g0 = H(x - c), g+ = grad L(x + rho g0) = g0 + rho H g0, and
d = (1 - lam/rho) g0 + lam/rho g+ = (H + lam H^2)(x - c) exactly, for any rho.

CMLR (Algorithm 1, normalised central difference, momentum v, per-chain norms) has no
closed form; Theorem 4.2 bounds it by v_LR (1 + sqrt(tau))^2 + O(.), with
v_LR = alpha^2 (eta mu)^2 sigma^2 (1 - a^2K)/(1 - a^2) / (1 - A_eff^2), a = 1 - eta mu (mu an
eigenvalue of H, not of H'), which is the Lookahead(SGD) closed form. We report the
measured CMLR variance next to it.

    python -m bench.nqm
"""
from __future__ import annotations

import argparse
import os

import torch

from lookahead_ext.optim.scheme import CENTRAL, FORWARD

from . import common


def closed_form(h, s2, eta, K, alpha, sigma_squared=False):
    a = 1 - eta * h
    noise = s2 ** 2 if sigma_squared else s2
    v_sgd = eta ** 2 * h ** 2 * noise / (1 - a ** 2)
    A_k, A_2k = 1 - a ** K, 1 - a ** (2 * K)
    v_la = alpha ** 2 * A_2k / (alpha ** 2 * A_2k + 2 * alpha * (1 - alpha) * A_k) * v_sgd
    return v_sgd, v_la


def _cycle_var(step_fn, x, K, alpha, burn, measure):
    """Run Lookahead cycles with inner step_fn(x, k) -> x; return mean over measured cycles of
    the across-chain variance of the slow weights (per coordinate)."""
    slow = x.clone()
    acc = torch.zeros(x.shape[1], dtype=x.dtype)
    for cyc in range(burn + measure):
        x = slow.clone()
        for k in range(K):
            x = step_fn(x, k)
        slow = slow + alpha * (x - slow)
        if cyc >= burn:
            acc += slow.var(dim=0)
    return acc / measure


ALL = ("SGD", "Lookahead(SGD) [library]", "LR (unnormalised)", "LR (normalised, eq. 6)", "CMLR (Alg. 1)")


def simulate(B, d, h, s2, eta, K, alpha, lam, rho, burn, measure, seed=0, betas=(0.9, 0.99),
             algs=ALL):
    g = torch.Generator().manual_seed(seed)
    sd = s2.sqrt()
    dt = torch.float64

    def sample_c():
        return torch.randn(B, d, generator=g, dtype=dt) * sd

    out = {}
    if "SGD" in algs:
        out["SGD"] = _sgd(B, d, h, eta, K, burn, measure, sample_c, dt)
    if "Lookahead(SGD) [library]" in algs:
        out["Lookahead(SGD) [library]"] = _lookahead_lib(B, d, h, eta, K, alpha, burn, measure, sample_c, dt)
    if "LR (unnormalised)" in algs:
        out["LR (unnormalised)"] = _cycle_var(_lr_step(h, eta, lam, rho, sample_c, False),
                                              torch.zeros(B, d, dtype=dt), K, alpha, burn, measure)
    if "LR (normalised, eq. 6)" in algs:
        out["LR (normalised, eq. 6)"] = _cycle_var(_lr_step(h, eta, lam, rho, sample_c, True),
                                                   torch.zeros(B, d, dtype=dt), K, alpha, burn, measure)
    if "CMLR (Alg. 1)" in algs:
        out["CMLR (Alg. 1)"] = _cycle_var(_cmlr_step(h, eta, lam, rho, K, betas, sample_c),
                                          torch.zeros(B, d, dtype=dt), K, alpha, burn, measure)
    return out


def _sgd(B, d, h, eta, K, burn, measure, sample_c, dt):
    """SGD inner steps (no lookahead): variance of the iterate."""
    x = torch.zeros(B, d, dtype=dt)
    acc = torch.zeros(d, dtype=dt)
    for t in range(burn * K + measure * K):
        x = x - eta * h * (x - sample_c())
        if t >= burn * K:
            acc += x.var(dim=0)
    return acc / (measure * K)


def _lookahead_lib(B, d, h, eta, K, alpha, burn, measure, sample_c, dt):
    """Lookahead(SGD) through the library: lookahead_ext.Lookahead around torch.optim.SGD."""
    import lookahead_ext as la
    p = torch.nn.Parameter(torch.zeros(B, d, dtype=dt))
    opt = la.Lookahead(torch.optim.SGD([p], lr=eta), k=K, alpha=alpha, backend="auto")
    acc = torch.zeros(d, dtype=dt)
    for cyc in range(burn + measure):
        for _ in range(K):
            p.grad = h * (p.detach() - sample_c())
            opt.step()
        if cyc >= burn:  # after a sync the parameter holds the slow weights
            acc += p.detach().var(dim=0)
    return acc / measure


def _lr_step(h, eta, lam, rho, sample_c, normalised):
    """LR inner step: unnormalised perturbation rho*g0 (exact finite difference on the
    quadratic) or eq. 6's normalised rho*g0/||g0|| (per-chain norm, no closed form)."""
    def step(x, k):
        c = sample_c()
        g0 = h * (x - c)
        e = g0 / (g0.norm(dim=1, keepdim=True) + 1e-12) if normalised else g0
        gp = h * (x + rho * e - c)
        c0, cp, _ = FORWARD.coefs(rho, lam)  # eq. 6
        return x - eta * (c0 * g0 + cp * gp)
    return step


def _cmlr_step(h, eta, lam, rho, K, betas, sample_c):
    """CMLR, Algorithm 1 (per-chain norms), gamma = 1/2 (eq. 10)."""
    state = {}
    bs, be = betas

    def cmlr_step(x, k):
        c = sample_c()
        if k == 0:
            state["v"] = h * (x - c)  # line 4: v0 = g0 (same minibatch)
        v = state["v"]
        vh = v / (v.norm(dim=1, keepdim=True) + 1e-12)
        gp = h * (x + rho * vh - c)
        gm = h * (x - rho * vh - c)
        _, cp, cm = CENTRAL.coefs(rho, lam)  # eq. 9
        dvec = cp * gp + cm * gm
        beta = bs if K == 1 else bs + (be - bs) * k / (K - 1)
        state["v"] = beta * vh + (1 - beta) / 2 * (gp / (gp.norm(dim=1, keepdim=True) + 1e-12)
                                                   + gm / (gm.norm(dim=1, keepdim=True) + 1e-12))
        return x - eta * dvec
    return cmlr_step


def run(args) -> dict:
    common.setup(args)
    d = 8
    B = 2000 if args.quick else 10000
    burn, measure = (100, 50) if args.quick else (200, 200)
    dt = torch.float64
    h = torch.linspace(0.2, 1.0, d, dtype=dt)
    s2 = torch.tensor([0.25, 0.5, 2.0, 4.0] * (d // 4), dtype=dt)
    eta, K, alpha, rho = 0.1, 5, 0.5, 0.05
    lam_lr, lam_cmlr = 0.5, 0.1
    meas = simulate(B, d, h, s2, eta, K, alpha, lam_lr, rho, burn, measure,
                    algs=("SGD", "Lookahead(SGD) [library]", "LR (unnormalised)"))
    # CMLR and eq. 6's LR at CMLR's lam (the paper's 0.1)
    meas_c = simulate(B, d, h, s2, eta, K, alpha, lam_cmlr, rho, burn, measure, seed=1,
                      algs=("LR (normalised, eq. 6)", "CMLR (Alg. 1)"))
    hp = h + lam_lr * h ** 2
    v_sgd, v_la = closed_form(h, s2, eta, K, alpha)
    v_sgd_sq, v_la_sq = closed_form(h, s2, eta, K, alpha, sigma_squared=True)
    _, v_lr = closed_form(hp, s2, eta, K, alpha)
    _, v_lr_sq = closed_form(hp, s2, eta, K, alpha, sigma_squared=True)
    _, v_lr_c = closed_form(h + lam_cmlr * h ** 2, s2, eta, K, alpha)

    def rel(m, c):
        return float(((m - c).abs() / c).max())

    checks = [
        ("SGD", meas["SGD"], v_sgd, v_sgd_sq),
        ("Lookahead(SGD) [library]", meas["Lookahead(SGD) [library]"], v_la, v_la_sq),
        (f"LR (unnormalised, lam={lam_lr})", meas["LR (unnormalised)"], v_lr, v_lr_sq),
    ]
    rows = []
    for name, m, c, csq in checks:
        rows.append(dict(name=name, measured=m.tolist(), closed_sigma=c.tolist(),
                         closed_sigma2=csq.tolist(), max_rel_err_sigma=rel(m, c),
                         max_rel_err_sigma2=rel(m, csq)))
    cm = meas_c["CMLR (Alg. 1)"]
    cmlr = dict(lam=lam_cmlr, measured=cm.tolist(), v_lr_thm42=v_la.tolist(),
                v_lr_hprime=v_lr_c.tolist(), lr_normalised_measured=meas_c["LR (normalised, eq. 6)"].tolist(),
                ratio_to_thm42=(cm / v_la).tolist(), ratio_to_lr_hprime=(cm / v_lr_c).tolist(),
                sum_measured=float(cm.sum()), sum_thm42=float(v_la.sum()))
    payload = dict(env=common.env_info("cpu"), setup=dict(d=d, chains=B, burn_cycles=burn,
                   measure_cycles=measure, h=h.tolist(), sigma_var=s2.tolist(), eta=eta, K=K,
                   alpha=alpha, rho=rho, lam_lr=lam_lr, lam_cmlr=lam_cmlr),
                   checks=rows, cmlr=cmlr)
    md_rows = [(r["name"], f"{r['max_rel_err_sigma'] * 100:.1f}%", f"{r['max_rel_err_sigma2'] * 100:.0f}%",
                "yes" if r["max_rel_err_sigma"] <= 0.05 else "NO") for r in rows]
    crow = [(f"{h[i]:.2f}", f"{s2[i]:g}", f"{cm[i]:.3e}", f"{v_la[i]:.3e}", f"{v_lr_c[i]:.3e}",
             f"{meas_c['LR (normalised, eq. 6)'][i]:.3e}", f"{cm[i] / v_la[i]:.3f}")
            for i in range(d)]
    md = (f"### Noisy quadratic model (d={d}, {B} chains, eta={eta}, K={K}, alpha={alpha})\n\n"
          "Steady-state variance of the slow weights, measured vs closed form (max relative error "
          "over coordinates; Sigma = covariance of c, s2 in {0.25, 0.5, 2, 4}):\n\n"
          + common.md_table(["optimizer", "err vs form with Sigma", "err vs form with Sigma^2",
                             "within 5%"], md_rows)
          + f"\n\nCMLR (Algorithm 1, lam={lam_cmlr}, rho={rho}) per coordinate, next to Thm 4.2's v_LR "
            "(= Lookahead(SGD) form with H), the LR form with H' = H + lam H^2, and LR (eq. 6, "
            "normalised) measured:\n\n"
          + common.md_table(["h", "s2", "CMLR measured", "v_LR (Thm 4.2)", "LR closed form (H')",
                             "LR eq.6 measured", "CMLR / v_LR"], crow))
    common.write_results(args.out, "nqm", payload, md)
    return payload


def main(argv=None):
    a = common.add_common_args(argparse.ArgumentParser(description=__doc__)).parse_args(argv)
    run(a)
    print(open(os.path.join(a.out, "nqm.md")).read())


if __name__ == "__main__":
    main()
