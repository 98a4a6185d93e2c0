"""LookaheadBio demonstrations on data that ships with installed packages (nothing is
downloaded): ``python -m lookahead_ext.bio.demos {quality,domain,llm,stability,all}
[--out results/bio] [--steps N] [--seeds N] [--seed N]``.

- quality    (paper §5.1.1): scikit-learn digits; a clean source (10% of the training
             data) and the same digits with 80% of labels replaced at random (90%);
             validation = clean digits.
- domain     (paper §5.1.2): next-byte prediction; English prose (CPython's language
             reference, ``pydoc_data/topics.py``) vs Python source (the standard library);
             validation = Python source.
- llm        the same API on a Hugging Face GPT-2 architecture built from a config (random
             init, byte-level vocabulary, no download), prose vs code, validation = code.
- stability  (Theorem 5): across seeds, the variance of the λ trajectory of LookaheadBio
             (k=5, β=0.5) and ScaleBiO (k=1, β=1) at equal steps, on the quality task.

Each prints the final weights and writes <name>.png, <name>.json (summary) and
<name>_history.csv under --out.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import sysconfig
import time

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from .core import LookaheadBio

DEFAULT_OUT = os.path.join("results", "bio")


# ---------------------------------------------------------------------------- data
def digits_sources(seed: int = 0, noise: float = 0.8, clean_frac: float = 0.1):
    """(clean_train, noisy_train, val, test) as (X float32 [n,64], y long [n]) tensors."""
    from sklearn.datasets import load_digits
    X, y = load_digits(return_X_y=True)
    rng = np.random.RandomState(seed)
    perm = rng.permutation(len(y))
    X = torch.tensor(X[perm] / 16.0, dtype=torch.float32)
    y = torch.tensor(y[perm], dtype=torch.long)
    val, test, train = slice(0, 300), slice(300, 600), slice(600, None)
    Xtr, ytr = X[train], y[train].clone()
    n_clean = int(round(clean_frac * len(ytr)))
    Xc, yc = Xtr[:n_clean], ytr[:n_clean]
    Xn, yn = Xtr[n_clean:], ytr[n_clean:].clone()
    flip = torch.tensor(rng.rand(len(yn)) < noise)
    yn[flip] = torch.tensor(rng.randint(0, 10, int(flip.sum())), dtype=torch.long)
    return (Xc, yc), (Xn, yn), (X[val], y[val]), (X[test], y[test])


def strip_python(src: bytes) -> bytes:
    """Python source without comments and docstrings (English prose inside code), so that
    the two domains are prose vs code proper. Files that fail to tokenize are kept whole."""
    import io
    import tokenize
    try:
        toks = list(tokenize.tokenize(io.BytesIO(src).readline))
    except (tokenize.TokenError, SyntaxError, IndentationError):
        return src
    out, prev = [], tokenize.INDENT
    for t in toks:
        if t.type == tokenize.COMMENT:
            continue
        if t.type == tokenize.STRING and prev in (tokenize.INDENT, tokenize.NEWLINE, tokenize.DEDENT,
                                                  tokenize.NL, tokenize.ENCODING):
            prev = t.type
            continue  # a docstring / bare string statement
        out.append(t)
        if t.type not in (tokenize.NL, tokenize.COMMENT):
            prev = t.type
    try:
        res = tokenize.untokenize(out)
    except Exception:
        return src
    lines = [ln.rstrip() for ln in res.decode("utf-8", "replace").splitlines()]
    return "\n".join(ln for ln in lines if ln.strip()).encode("utf-8")


def text_corpora(max_bytes: int = 600_000, strip_code: bool = True):
    """(prose bytes, code bytes) from CPython itself: the language reference shipped as
    ``pydoc_data.topics`` and the standard library's top-level .py files (sorted; comments
    and docstrings removed with ``strip_code``)."""
    import pydoc_data.topics as topics
    prose = "\n\n".join(topics.topics[k] for k in sorted(topics.topics)).encode("utf-8", "replace")
    stdlib = sysconfig.get_paths()["stdlib"]
    code, total = [], 0
    for path in sorted(glob.glob(os.path.join(stdlib, "*.py"))):
        with open(path, "rb") as f:
            b = f.read()
        if strip_code:
            b = strip_python(b)
        code.append(b)
        total += len(b)
        if total >= max_bytes:
            break
    code = b"\n".join(code)
    return (torch.frombuffer(bytearray(prose[:max_bytes]), dtype=torch.uint8).long(),
            torch.frombuffer(bytearray(code[:max_bytes]), dtype=torch.uint8).long())


def split(t: torch.Tensor, frac: float = 0.8):
    n = int(len(t) * frac)
    return t[:n], t[n:]


def windows(data: torch.Tensor, n: int, length: int, gen: torch.Generator) -> torch.Tensor:
    idx = torch.randint(0, len(data) - length - 1, (n,), generator=gen)
    return torch.stack([data[i:i + length + 1] for i in idx.tolist()])


# ---------------------------------------------------------------------------- models
class ByteMLP(nn.Module):
    """Next-byte model: the last `ctx` bytes -> embedding -> MLP -> 256 logits."""

    def __init__(self, ctx: int = 12, emb: int = 24, hidden: int = 128):
        super().__init__()
        self.ctx = ctx
        self.emb = nn.Embedding(256, emb)
        self.net = nn.Sequential(nn.Linear(ctx * emb, hidden), nn.GELU(), nn.Linear(hidden, 256))

    def forward(self, x):
        return self.net(self.emb(x).flatten(1))


def byte_mlp_loss(model, batch):
    """batch: LongTensor [B, ctx+1]; per-example CE of the last byte."""
    return F.cross_entropy(model(batch[:, :-1]), batch[:, -1], reduction="none")


def clf_loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="none")


def causal_lm_loss(model, batch):
    """Per-sequence mean next-token loss of a Hugging Face causal LM on byte ids [B, T+1]."""
    logits = model(input_ids=batch[:, :-1]).logits
    tok = F.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none")
    return tok.mean(1)


# ---------------------------------------------------------------------------- helpers
def _report(bio: LookaheadBio, summary: dict, line: str, out: str, title: str, quiet: bool,
            save: bool) -> dict:
    """Print the demo's final ``line``, save its figure/history/JSON to ``out`` (``save``) and
    return ``summary`` with the LookaheadBio attached under "_bio"."""
    if not quiet:
        print(line)
    if save:
        _save(bio, out, summary["demo"], summary, title)
    summary["_bio"] = bio
    return summary


def _save(bio: LookaheadBio, out: str, name: str, summary: dict, title: str) -> None:
    os.makedirs(out, exist_ok=True)
    bio.plot_weights(os.path.join(out, f"{name}.png"), title=title)
    bio.save_history(os.path.join(out, f"{name}_history.csv"))
    with open(os.path.join(out, f"{name}.json"), "w") as f:
        json.dump(summary, f, indent=1)


def _fmt(names, p):
    return ", ".join(f"{n}={float(v):.3f}" for n, v in zip(names, p))


@torch.no_grad()
def _acc(model, X, y):
    return float((model(X).argmax(1) == y).float().mean())


def _mlp(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def run_quality(out=DEFAULT_OUT, steps=600, seed=0, k=5, beta=0.5, batch=32, quiet=False,
                save=True, lr_lam=1e-2, compare_literal=False, **kw):
    """Demo 1. Returns the summary dict (and the LookaheadBio object under '_bio')."""
    t0 = time.time()
    (Xc, yc), (Xn, yn), (Xv, yv), (Xt, yt) = digits_sources(seed)
    model = _mlp(seed)
    names = ["clean", "noisy"]
    bio = LookaheadBio(model, clf_loss, 2, k=k, beta_w=beta, beta_lam=beta, alpha=100.0,
                       base="adamw", lr_w=1e-3, lr_lam=lr_lam, source_names=names, **kw)
    g = torch.Generator().manual_seed(seed + 1)
    for _ in tqdm(range(steps), desc="quality", disable=quiet, mininterval=0.5):
        ic = torch.randint(0, len(yc), (batch,), generator=g)
        inn = torch.randint(0, len(yn), (batch,), generator=g)
        iv = torch.randint(0, len(yv), (batch,), generator=g)
        bio.step([(Xc[ic], yc[ic]), (Xn[inn], yn[inn])], (Xv[iv], yv[iv]))
    bio.sync()
    p = bio.weights()
    summary = {"demo": "quality", "steps": steps, "seed": seed, "k": k, "beta": beta,
               "data": f"sklearn digits; clean {len(yc)} ex. (10%), noisy {len(yn)} ex. (90%, 80% labels random)",
               "final_weights": dict(zip(names, p.tolist())),
               "test_acc_slow_w": _acc(model, Xt, yt), "runtime_s": round(time.time() - t0, 1),
               "target": "p_clean >= 0.8", "pass": bool(p[0] >= 0.8)}
    if compare_literal:
        # Algorithm 1 read literally (line 14: u never reset; u_sync=False), same data and seed
        lit = run_quality(out, steps=steps, seed=seed, k=k, beta=beta, batch=batch, quiet=True,
                          save=False, lr_lam=lr_lam, u_sync=False)
        summary["final_weights_algorithm1_literal_u_sync_false"] = lit["final_weights"]
        if not quiet:
            print(f"[quality] Algorithm 1 literal (u_sync=False): {_fmt(names, lit['final_weights'].values())}")
    summary["runtime_s"] = round(time.time() - t0, 1)
    return _report(bio, summary, f"[quality] final weights: {_fmt(names, p)}  (target clean >= 0.8)  "
                   f"test acc {summary['test_acc_slow_w']:.3f}  {summary['runtime_s']}s", out,
                   "Quality: clean 10% vs label-noise 90% (digits)", quiet, save)


def run_domain(out=DEFAULT_OUT, steps=1000, seed=0, batch=48, quiet=False, save=True):
    """Demo 2: prose vs Python source, validation = Python source."""
    t0 = time.time()
    prose, code = text_corpora()
    prose_tr, _ = split(prose)
    code_tr, code_val = split(code)
    torch.manual_seed(seed)
    model = ByteMLP()
    names = ["prose", "python"]
    bio = LookaheadBio(model, byte_mlp_loss, 2, base="adamw", lr_w=2e-3, source_names=names)
    g = torch.Generator().manual_seed(seed + 1)
    L = model.ctx
    for _ in tqdm(range(steps), desc="domain", disable=quiet, mininterval=0.5):
        bio.step([windows(prose_tr, batch, L, g), windows(code_tr, batch, L, g)],
                 windows(code_val, batch, L, g))
    bio.sync()
    p = bio.weights()
    with torch.no_grad():
        gv = torch.Generator().manual_seed(123)
        val_loss = float(byte_mlp_loss(model, windows(code_val, 2000, L, gv)).mean())
    summary = {"demo": "domain", "steps": steps, "seed": seed,
               "data": f"prose: pydoc_data.topics ({len(prose)} B), code: stdlib *.py ({len(code)} B)",
               "final_weights": dict(zip(names, p.tolist())), "val_loss_nats_per_byte": val_loss,
               "runtime_s": round(time.time() - t0, 1), "target": "p_python >= 0.95",
               "pass": bool(p[1] >= 0.95)}
    return _report(bio, summary, f"[domain] final weights: {_fmt(names, p)}  (target python >= 0.95)  "
                   f"{summary['runtime_s']}s", out, "Domain shift: prose vs Python (val: Python)",
                   quiet, save)


def run_llm(out=DEFAULT_OUT, steps=150, seed=0, batch=8, seq=64, quiet=False, save=True):
    """Demo 3: GPT-2 architecture from a config (random init, byte vocabulary)."""
    t0 = time.time()
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=256, n_positions=seq, n_embd=64, n_layer=2, n_head=4,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg)
    model.train()
    prose, code = text_corpora(300_000)
    prose_tr, _ = split(prose)
    code_tr, code_val = split(code)
    names = ["prose", "python"]
    # train a subset: every parameter but the (tied) token embedding / LM head
    trained = [p for n, p in model.named_parameters() if "wte" not in n]
    bio = LookaheadBio(model, causal_lm_loss, 2, params=trained, base="adamw", lr_w=2e-3,
                       source_names=names)
    g = torch.Generator().manual_seed(seed + 1)
    for _ in tqdm(range(steps), desc="llm", disable=quiet, mininterval=0.5):
        bio.step([windows(prose_tr, batch, seq, g), windows(code_tr, batch, seq, g)],
                 windows(code_val, batch, seq, g))
    bio.sync()
    p = bio.weights()
    n_all = sum(p.numel() for p in model.parameters())
    n_tr = sum(p.numel() for p in trained)
    rows = bio.history()
    summary = {"demo": "llm", "steps": steps, "seed": seed,
               "model": f"GPT2LMHeadModel n_layer=2 n_embd=64 vocab=256 ({n_all} params, {n_tr} trained)",
               "final_weights": dict(zip(names, p.tolist())),
               "val_loss_first": rows[0]["val_loss"], "val_loss_last": rows[-1]["val_loss"],
               "runtime_s": round(time.time() - t0, 1)}
    return _report(bio, summary, f"[llm] final weights: {_fmt(names, p)}  val loss "
                   f"{rows[0]['val_loss']:.3f} -> {rows[-1]['val_loss']:.3f}  {summary['runtime_s']}s",
                   out, "GPT-2 (config, random init): prose vs Python", quiet, save)


def run_stability(out=DEFAULT_OUT, steps=600, seeds=5, quiet=False, save=True):
    """Demo 4: λ-trajectory variance, LookaheadBio (k=5, β=0.5) vs ScaleBiO (k=1, β=1)."""
    t0 = time.time()
    trajs = {}
    configs = {"lookaheadbio_k5_b0.5": (5, 0.5), "scalebio_k1_b1": (1, 1.0)}
    bar = tqdm(total=len(configs) * seeds, desc="stability", disable=quiet)
    for name, (k, beta) in configs.items():
        runs = []
        for s in range(seeds):
            r = run_quality(out, steps=steps, seed=s, k=k, beta=beta, quiet=True, save=False)
            rows = r["_bio"].history()
            # λ trajectory: the clean-minus-noisy logit of the weights the method outputs
            runs.append([np.log(x["p_clean"] / x["p_noisy"]) for x in rows])
            bar.update(1)
        trajs[name] = np.array(runs)
    bar.close()
    res = {}
    for name, T in trajs.items():
        incr = np.diff(T, axis=1)
        # step-to-step jitter: increments minus their 10-step moving mean
        kern = np.ones(10) / 10
        jit = np.array([x - np.convolve(x, kern, mode="same") for x in incr])[:, 10:-10]
        res[name] = {"across_seed_var_mean": float(T.var(axis=0).mean()),
                     "across_seed_var_final": float(T[:, -1].var()),
                     "increment_var": float(incr.var()),
                     "jitter_var": float(jit.var()),
                     "final_logit_mean": float(T[:, -1].mean()),
                     "final_p_clean_mean": float((1 / (1 + np.exp(-T[:, -1]))).mean())}
    a, b = res["lookaheadbio_k5_b0.5"], res["scalebio_k1_b1"]
    ratios = {key: a[key] / b[key] for key in ("across_seed_var_mean", "across_seed_var_final",
                                               "increment_var", "jitter_var")}
    summary = {"demo": "stability", "steps": steps, "seeds": seeds, "task": "quality (digits)",
               "trajectory": "log(p_clean/p_noisy) of the reported (slow for LookaheadBio) weights, every step",
               "results": res, "ratio_lookahead_over_scalebio": ratios,
               "runtime_s": round(time.time() - t0, 1)}
    if not quiet:
        for name, r in res.items():
            print(f"[stability] {name}: across-seed var (mean over steps) {r['across_seed_var_mean']:.4f}, "
                  f"final {r['across_seed_var_final']:.4f}; step-increment var {r['increment_var']:.2e}; "
                  f"final p_clean {r['final_p_clean_mean']:.3f}")
        print("[stability] ratio LookaheadBio/ScaleBiO: " + ", ".join(f"{k}={v:.3f}" for k, v in ratios.items()))
    if save:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        os.makedirs(out, exist_ok=True)
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for (name, T), c in zip(trajs.items(), ("C0", "C3")):
            for x in T:
                ax.plot(1 / (1 + np.exp(-x)), color=c, lw=0.8, alpha=0.6)
            ax.plot([], [], color=c, label=name)
        ax.set_xlabel("step")
        ax.set_ylabel("p_clean")
        ax.set_title(f"Stability: {seeds} seeds, quality task")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(os.path.join(out, "stability.png"), dpi=120)
        plt.close(fig)
        with open(os.path.join(out, "stability.json"), "w") as f:
            json.dump(summary, f, indent=1)
    return summary


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m lookahead_ext.bio.demos", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", choices=["quality", "domain", "llm", "stability", "all"])
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    names = ["quality", "domain", "llm", "stability"] if args.name == "all" else [args.name]
    for n in names:
        kw = {} if args.steps is None else {"steps": args.steps}
        if n == "stability":
            run_stability(args.out, seeds=args.seeds, **kw)
        else:
            if n == "quality":
                kw["compare_literal"] = True
            {"quality": run_quality, "domain": run_domain, "llm": run_llm}[n](args.out, seed=args.seed, **kw)
    return 0


if __name__ == "__main__":
    sys.exit(main())
