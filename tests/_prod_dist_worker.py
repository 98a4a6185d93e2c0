"""Worker of tests/test_prod_distributed.py: 2 gloo processes on loopback run every
distributed check once (spawned process groups are slow, so they are shared), and each
rank saves what it saw; the test process compares."""
import datetime
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

STEPS, K, LR = 5, 3, 0.1


def mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def bn_mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Tanh(),
                               torch.nn.Linear(8, 1))


def full_data():
    g = torch.Generator().manual_seed(5)
    return torch.randn(16, 4, generator=g), torch.randn(16, 1, generator=g)


def _init(tmp, name, rank, world):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"file://{tmp}/{name}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))


def check_ddp_equivalence(rank, world, out):
    """CMLR under DDP, 2 micro-batches accumulated per probe; the parent compares with the
    single-process run on the concatenated batch."""
    import lookahead_ext as la
    from lookahead_ext.distributed import DistributedProbes
    from torch.nn.parallel import DistributedDataParallel as DDP
    from _prod_util import accumulated_loss

    x, y = full_data()
    xs, ys = x.chunk(world)[rank], y.chunk(world)[rank]
    model = DDP(mlp())
    ddp_reduces = []

    def comm_hook(state, bucket):                 # counts DDP's own all-reduces
        ddp_reduces.append(1)
        fut = torch.futures.Future()
        fut.set_result(bucket.buffer())
        return fut
    model.register_comm_hook(None, comm_hook)
    opt = la.CMLR(model.parameters(), lr=LR, k=K, backend="reference")
    dp = DistributedProbes(opt, model)
    probe_points = []
    losses = []
    for _ in range(STEPS):
        for probe in dp.probes():
            probe_points.append([p.detach().clone() for p in model.parameters()])
            probe.loss = accumulated_loss(model, xs, ys, 2)
        losses.append(opt.last_loss.clone())
    out["ddp"] = dict(params=[p.detach().clone() for p in model.parameters()],
                      probe_points=probe_points, losses=losses, evals=opt.num_evals,
                      all_reduces=dp.num_all_reduces, ddp_reduces=len(ddp_reduces))


def check_overflow_one_rank(rank, world, out):
    """A forced overflow on rank 1 only: both ranks skip the step, the scale backs off."""
    import lookahead_ext as la
    from lookahead_ext.distributed import DistributedProbes
    from torch.nn.parallel import DistributedDataParallel as DDP

    x, y = full_data()
    xs, ys = x.chunk(world)[rank], y.chunk(world)[rank]
    model = DDP(mlp())
    opt = la.SAM(model.parameters(), lr=LR, backend="reference")
    dp = DistributedProbes(opt, model)
    sc = torch.amp.GradScaler("cpu", init_scale=1024.0)
    res = []
    for it in range(3):
        before = [p.detach().clone() for p in model.parameters()]
        calls = []

        def closure():
            calls.append(1)
            loss = F.mse_loss(model(xs), ys)
            s = sc.scale(loss)
            if it == 1 and rank == 1 and len(calls) == 2:
                s = s * float("inf")
            s.backward()
            return loss.detach()
        dp.step(closure, scaler=sc)
        sc.update()
        unchanged = all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
        res.append((unchanged, sc.get_scale(), opt.num_skipped, len(calls)))
    out["overflow"] = dict(res=res, params=[p.detach().clone() for p in model.parameters()])


def _ckpt_setup(seed):
    import lookahead_ext as la
    from lookahead_ext.batchnorm import apply_batchnorm_mode
    from lookahead_ext.distributed import DistributedProbes
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(bn_mlp(seed))
    opt = la.CMLR(model.parameters(), lr=LR, k=K, momentum=0.9, backend="reference")
    apply_batchnorm_mode(model, opt, "first")
    sc = torch.amp.GradScaler("cpu", init_scale=256.0, growth_interval=2)
    return model, opt, DistributedProbes(opt, model), sc


def _ckpt_steps(rank, world, model, dp, sc, steps, start):
    x, y = full_data()
    for it in range(start, start + steps):
        xs, ys = (x.roll(it, 0)).chunk(world)[rank], (y.roll(it, 0)).chunk(world)[rank]

        def closure():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = F.mse_loss(model(xs).float(), ys)
            sc.scale(loss).backward()
            return loss.detach()
        dp.step(closure, scaler=sc)
        sc.update()


def check_checkpoint(rank, world, out, tmp):
    """Save mid-cycle (k=2 of K=3) under DDP with BN, AMP autocast and a GradScaler;
    resume in a new process group with fresh objects; continue bit-identically."""
    model, opt, dp, sc = _ckpt_setup(0)
    _ckpt_steps(rank, world, model, dp, sc, 2, 0)
    assert opt.cycle_position == 2
    if rank == 0:
        torch.save(dict(model=model.module.state_dict(), opt=opt.state_dict(),
                        scaler=sc.state_dict()), f"{tmp}/ckpt.pt")
    dist.barrier()
    _ckpt_steps(rank, world, model, dp, sc, 4, 2)
    out["ckpt_straight"] = [t.detach().clone() for t in model.module.state_dict().values()]
    out["ckpt_scale"] = sc.get_scale()
    out["ckpt_names"] = list(model.module.state_dict())
    dp.sync_buffers()
    out["ckpt_buffers_synced"] = [b.clone() for b in model.module.buffers()]


def check_resume(rank, world, out, tmp):
    model, opt, dp, sc = _ckpt_setup(123)           # different init: the load must fix it
    ck = torch.load(f"{tmp}/ckpt.pt", weights_only=False)
    model.module.load_state_dict(ck["model"])
    opt.load_state_dict(ck["opt"])
    sc.load_state_dict(ck["scaler"])
    assert opt.cycle_position == 2
    _ckpt_steps(rank, world, model, dp, sc, 4, 2)
    out["ckpt_resumed"] = [t.detach().clone() for t in model.module.state_dict().values()]
    out["ckpt_resumed_scale"] = sc.get_scale()


FSDP_STEPS = 4


def check_fsdp2(rank, world, out):
    """FSDP2 (fully_shard) on CPU/gloo: CMLR on the local shards with global norms; the
    parent compares with the single-process run on the concatenated batch. Then a forced
    overflow on rank 1 only must skip the step on both ranks."""
    import lookahead_ext as la
    from lookahead_ext.distributed import FSDPProbes, local_shards
    from torch.distributed.fsdp import fully_shard

    model = mlp()
    fully_shard(model)
    opt = la.CMLR(local_shards(model), lr=LR, k=K, momentum=0.9, backend="reference")
    fp = FSDPProbes(opt, model)
    x, y = full_data()
    xs, ys = x.chunk(world)[rank], y.chunk(world)[rank]
    losses = []
    for _ in range(FSDP_STEPS):
        def closure():
            loss = F.mse_loss(model(xs), ys)
            loss.backward()
            return loss
        losses.append(fp.step(closure).detach().clone())
    full = [p.full_tensor().detach().clone() for p in model.parameters()]
    calls = []

    def bad():
        calls.append(1)
        loss = F.mse_loss(model(xs), ys)
        (loss * (float("inf") if rank == 1 and len(calls) == 2 else 1.0)).backward()
        return loss
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fp.step(bad)
    after = [p.full_tensor().detach().clone() for p in model.parameters()]
    out["fsdp2"] = dict(params=full, losses=losses, skipped=opt.num_skipped,
                        unchanged=all(torch.equal(a, b) for a, b in zip(full, after)))


def bio_data():
    g = torch.Generator().manual_seed(7)
    xs = [torch.randn(16, 4, generator=g) for _ in range(2)]
    ys = [xs[0][:, :1].tanh(), torch.randn(16, 1, generator=g)]   # clean / noisy source
    xv = torch.randn(16, 4, generator=g)
    return list(zip(xs, ys)), (xv, xv[:, :1].tanh())


def bio_loss(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).mean(1)


def make_bio():
    from lookahead_ext.bio import LookaheadBio
    return LookaheadBio(mlp(), bio_loss, 2, k=2, alpha=10.0, lr_w=0.05, lr_lam=0.5,
                        backend="reference")


BIO_STEPS = 4


def check_bio(rank, world, out):
    """LookaheadBio data-parallel: each rank gets half of every source and validation batch."""
    try:
        import lookahead_ext.bio  # noqa: F401
    except ImportError:
        out["bio"] = None                        # LookaheadBio not in this tree
        return
    from lookahead_ext.distributed import DistributedBio
    torch.manual_seed(rank)                      # different init per rank: the install syncs it
    bio = make_bio()
    if rank == 1:
        with torch.no_grad():
            for p in bio.params:
                p.add_(1.0)
    DistributedBio(bio)
    train, (xv, yv) = bio_data()
    rows = []
    for _ in range(BIO_STEPS):
        shard = [(x.chunk(world)[rank], y.chunk(world)[rank]) for x, y in train]
        rows.append(bio.step(shard, (xv.chunk(world)[rank], yv.chunk(world)[rank])))
    out["bio"] = dict(weights=bio.weights(), fast=bio.fast_weights(),
                      params=[p.detach().clone() for p in bio.params],
                      val=[r["val_loss"] for r in rows])


def worker(rank, world, tmp):
    torch.set_num_threads(1)
    out = {}
    try:
        _init(tmp, "pg1", rank, world)
        check_ddp_equivalence(rank, world, out)
        check_overflow_one_rank(rank, world, out)
        check_checkpoint(rank, world, out, tmp)
        check_fsdp2(rank, world, out)
        check_bio(rank, world, out)
        dist.barrier()
        dist.destroy_process_group()
        _init(tmp, "pg2", rank, world)              # a new process group
        check_resume(rank, world, out, tmp)
        dist.barrier()
        dist.destroy_process_group()
    except Exception:
        import traceback
        out["error"] = traceback.format_exc()
        if dist.is_initialized():
            dist.destroy_process_group()
    torch.save(out, f"{tmp}/rank{rank}.pt")
