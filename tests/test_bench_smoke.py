"""Smoke test of the benchmark suite: the quick suite runs and writes its files.

No timing assertions. bench/ is not installed: it is found by appending the repository root
to sys.path, so lookahead_ext is whichever one the test session imports (installed or source).
"""
import importlib.util
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quick_suite_writes_results(tmp_path):
    out = tmp_path / "results"
    code = (f"import sys; sys.path.append({ROOT!r}); from bench.run_all import main; "
            f"main(['--quick', '--out', {str(out)!r}])")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    parts = ["kernels_cpu", "table8_cpu", "nqm", "digits"]
    if importlib.util.find_spec("pytorch_optimizer") is not None:
        parts.append("peers_cpu")
    for name in parts:
        payload = json.loads((out / f"{name}.json").read_text())
        assert payload["env"]["torch"] and payload["env"]["command"]
        assert (out / f"{name}.md").read_text().strip()
    for png in ("kernels_cpu.png", "table8_cpu.png", "digits_acc_vs_backprops.png", "digits_cosine.png"):
        assert (out / png).stat().st_size > 0
    assert (out / "summary_cpu.md").read_text().strip()
    # Table 8's counts are counted by the closure; they must equal the paper's (GSAM:
    # GraphSAM's own count, see bench/table8.py)
    rows = json.loads((out / "table8_cpu.json").read_text())["rows"]
    for r in rows:
        assert r["evals_per_update"] == r["expected_count"], r["label"]


def test_fused_ops_only_replays_the_step_exactly():
    """bench.peers' floor: the recorded raw op calls of one SAM step, replayed from the same
    starting point, give bitwise the step's result (and the reference path records none)."""
    import pytest
    import torch
    sys.path.append(ROOT)
    import lookahead_ext as la
    from lookahead_ext import ops
    from bench.peers import fused_ops_only
    if ops.available_backends()["cpp"] != "ok":
        pytest.skip("cpp backend not built")
    torch.manual_seed(0)
    params = [torch.randn(n, requires_grad=True) for n in (7, 1031, 64)]
    grads = [torch.randn_like(p) for p in params]
    for backend, expect_ops in (("cpp", True), ("reference", False)):
        opt = la.SAM(params, lr=0.1, momentum=0.9, backend=backend)

        def step():
            for _probe in opt.probes():
                for p, g in zip(params, grads):
                    p.grad = g.clone()
        step()  # state exists from here on
        snap = [t.detach().clone() for t in params] + [opt.state[p]["momentum_buffer"].clone()
                                                       for p in params]
        replay = fused_ops_only(step)
        if not expect_ops:
            assert replay is None
            continue
        after = [t.detach().clone() for t in params] + [opt.state[p]["momentum_buffer"].clone()
                                                        for p in params]
        assert not all(torch.equal(a, b) for a, b in zip(snap, after))
        with torch.no_grad():
            for t, s in zip(params + [opt.state[p]["momentum_buffer"] for p in params], snap):
                t.copy_(s)
        replay()
        again = [t.detach() for t in params] + [opt.state[p]["momentum_buffer"] for p in params]
        for a, b in zip(after, again):
            assert torch.equal(a, b)


def test_target_verdicts():
    """bench.peers' verdict on the >= 3x target: met, out of reach (the floor, plus the step
    wrapper for a Lookahead row, is above a third of the peer), or missed by host time."""
    sys.path.append(ROOT)
    from bench.peers import target_verdicts
    tim = {
        "A: SAM step": dict(ours=1.0, ours_ops_only=0.5, peer=3.0),             # met
        "B: SAM step": dict(ours=2.0, ours_ops_only=1.5, peer=4.0),             # 4/1.5 < 3
        "C: SAM step": dict(ours=2.0, ours_ops_only=0.5, peer=3.0),             # host 1.5 > 0.5
        "D: Lookahead sync": dict(ours=2.0, ours_ops_only=0.9, peer=3.0),       # 0.9 + 0.2 > 1
        "E: GSAM": dict(ours=1.0, peer=1.0),                                    # no floor: no row
    }
    got = {name: verdict for name, _ratio, verdict in target_verdicts(tim, wrapper=0.2)}
    assert set(got) == {"A: SAM step", "B: SAM step", "C: SAM step", "D: Lookahead sync"}
    assert got["A: SAM step"] == "met"
    assert got["B: SAM step"].startswith("out of reach")
    assert got["C: SAM step"].startswith("missed") and "1500.000 ms" in got["C: SAM step"]
    assert got["D: Lookahead sync"].startswith("out of reach") and "wrapper" in got["D: Lookahead sync"]
