"""DTensor weights (FSDP2, tensor parallel, HSDP) and DDP, on 2 and 4 local ranks (gloo on
127.0.0.1, spawned and joined by tests/dist_utils.py, each run bounded in time).

The oracle is spectral_ext.reference on the full (unsharded) matrices: every rank builds the same
full tensors from the same seed, shards them, runs the sharded step, and compares the gathered
result."""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
from torch import nn

import spectral_ext as se
from spectral_ext import reference

from conftest import SEED, assert_rel_close
from dist_utils import run_ranks

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def _planted(rows, cols, gen, gap=2.0):
    """A random matrix with sigma_1 = gap * sigma_2 (power iteration converges fast)."""
    k = min(rows, cols)
    u, _ = torch.linalg.qr(torch.randn(rows, k, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, k, generator=gen, dtype=torch.float64))
    s = torch.linspace(1.0, 0.1, k, dtype=torch.float64)
    s[0] = gap
    return (u * s) @ v.t()


def _cases(world):
    """(full shape, placements on a 1-D mesh) with even and uneven shards, a rank with no rows
    (1 x 9 on >1 ranks), conv weights, row and column sharding, replication."""
    from torch.distributed.tensor import Replicate, Shard
    return [((8, 6), [Shard(0)]), ((7, 5), [Shard(0)]), ((1, 9), [Shard(0)]),
            ((5, 8), [Shard(1)]), ((6, 7), [Shard(1)]), ((6, 4, 3, 3), [Shard(0)]),
            ((6, 4, 3, 3), [Shard(1)]), ((4, 5), [Replicate()]), ((11, 1), [Shard(0)]),
            ((5, 6), [Shard(0)], torch.float64), ((6, 5), [Shard(1)], torch.float64)]


def _sharded_math(rank, world, seed, mesh_shape, placements_2d):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor
    mesh = init_device_mesh("cpu", mesh_shape)
    gen = torch.Generator().manual_seed(seed)
    if placements_2d is None:
        cases = _cases(world)
    else:
        cases = [(shape, placements_2d) for shape in ((8, 6), (7, 5), (6, 4, 3, 3), (3, 10))]
    cases = [(c[0], c[1], c[2] if len(c) > 2 else torch.float32) for c in cases]
    fulls = [torch.randn(s, generator=gen, dtype=dt) for s, _, dt in cases]
    grads = [torch.randn(s, generator=gen, dtype=dt) for s, _, dt in cases]
    dw = [distribute_tensor(f, mesh, p) for f, (_, p, _) in zip(fulls, cases)]
    dg = [distribute_tensor(g, mesh, p) for g, (_, p, _) in zip(grads, cases)]
    vs = se.init_vectors(fulls, seed=seed % 1000)
    vs_ref = [v.clone() for v in vs]
    g_ref = [g.clone() for g in grads]

    # one step adds exactly lam * sigma * u v^T of the full matrix into the sharded grads
    sig = se.fused_step(dw, vs, lam=0.3, n_iter=2, grads=dg)
    sig_ref = reference.fused_step(fulls, vs_ref, lam=0.3, n_iter=2, grads=g_ref)
    assert_rel_close(sig, sig_ref, 1e-5, f"sigma (rank {rank})")
    for i, (g, gr, v, vr) in enumerate(zip(dg, g_ref, vs, vs_ref)):
        assert_rel_close(g.full_tensor(), gr, 1e-5, f"grad {i} (rank {rank})")
        assert_rel_close(v, vr, 1e-5, f"v {i} (rank {rank})")

    # the gradient of the differentiable penalty, sharded like the weights
    dws = [distribute_tensor(f, mesh, p).requires_grad_() for f, (_, p, _) in zip(fulls, cases)]
    fw = [f.clone().requires_grad_() for f in fulls]
    v2, v2_ref = [v.clone() for v in vs], [v.clone() for v in vs]
    s = se.spectral_norms(dws, v2, 3)
    (0.5 * s.square().sum()).backward()
    s_ref = reference.spectral_norms(fw, v2_ref, 3)[0]
    (0.5 * s_ref.square().sum()).backward()
    assert_rel_close(s.detach(), s_ref.detach(), 1e-5, "spectral_norms")
    for i, (a, b) in enumerate(zip(dws, fw)):
        assert tuple(a.grad.placements) == tuple(a.placements)
        assert_rel_close(a.grad.full_tensor(), b.grad, 1e-5, f"penalty grad {i}")

    # many iterations converge to the full matrix's norm (planted gap: fast, certain)
    planted = [_planted(s[0], torch.Size(s[1:]).numel(), gen).to(dt).reshape(s)
               for s, _, dt in cases]
    dp = [distribute_tensor(f, mesh, p) for f, (_, p, _) in zip(planted, cases)]
    vp = se.init_vectors(planted, seed=1)
    sig = se.fused_step(dp, vp, lam=0.0, n_iter=60, grads=[torch.zeros_like(d) for d in dp])
    exact = torch.stack([torch.linalg.matrix_norm(f.reshape(f.shape[0], -1).double(), 2)
                         for f in planted])
    assert_rel_close(sig, exact, 1e-4, "converged sigma")


@pytest.mark.parametrize("world", [2, 4])
def test_sharded_step_matches_the_full_matrix(world):
    run_ranks(_sharded_math, world, SEED, (world,), None, timeout=180)


def _two_d(rank, world, seed):
    from torch.distributed.tensor import Replicate, Shard
    # HSDP: replicate on mesh dim 0, shard rows on mesh dim 1; and a 2-D block decomposition
    for placements in ([Replicate(), Shard(0)], [Shard(0), Shard(1)], [Shard(1), Replicate()]):
        _sharded_math(rank, world, seed, (2, 2), placements)


def test_hsdp_and_2d_meshes_on_4_ranks():
    run_ranks(_two_d, 4, SEED, timeout=180)


def _bad_input(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
    mesh = init_device_mesh("cpu", (world,))
    w = distribute_tensor(torch.randn(4, 3, 2, 2), mesh, [Shard(0)])
    plain = torch.randn(4, 3)
    g = torch.zeros_like(w)
    before = g.to_local().clone()

    def refused(ws, match, exc=ValueError, grads=None):
        vs = se.init_vectors(ws)
        v0 = [v.clone() for v in vs]
        with pytest.raises(exc, match=match):
            se.fused_step(ws, vs, lam=0.1, grads=grads)
        assert all(torch.equal(a, b) for a, b in zip(vs, v0))
        assert torch.equal(g.to_local(), before)

    refused([w, plain], r"weights\[1\] is a plain tensor but other weights are DTensors",
            TypeError, grads=[g, torch.zeros(4, 3)])
    from torch.distributed.device_mesh import DeviceMesh
    other = DeviceMesh("cpu", list(reversed(range(world))))      # the same ranks, another mesh
    od = distribute_tensor(torch.randn(4, 3), other, [Shard(0)])
    refused([w, od], r"weights\[1\] is on device mesh .* all DTensor weights of one call must "
            r"share one mesh", grads=[g, torch.zeros_like(od)])
    partial = DTensor.from_local(torch.randn(4, 3), mesh, [Partial()])
    refused([w, partial], r"weights\[1\] has placement Partial.* only Shard\(0\), Shard\(1\)",
            grads=[g, torch.zeros_like(partial)])
    s2 = distribute_tensor(torch.randn(4, 3, 2, 2), mesh, [Shard(2)])
    refused([w, s2], r"weights\[1\] is sharded on tensor dim 2", grads=[g, torch.zeros_like(s2)])
    refused([w], r"grads\[0\] must be a DTensor with the placements of weights\[0\]",
            grads=[torch.zeros(4, 3, 2, 2)])
    # the memory rule of every backend, on the local shards: two gradients sharing memory
    w2 = distribute_tensor(torch.randn(4, 3, 2, 2), mesh, [Shard(0)])
    alias = DTensor.from_local(g.to_local(), mesh, [Shard(0)], run_check=False,
                               shape=g.shape, stride=g.stride())
    refused([w, w2], r"grads\[0\] and grads\[1\] overlap in memory", grads=[g, alias])
    # an existing .grad sharded unlike its weight: refused before anything is written
    wa = nn.Parameter(distribute_tensor(torch.randn(4, 3), mesh, [Shard(0)]))
    wb = nn.Parameter(distribute_tensor(torch.randn(4, 3), mesh, [Shard(0)]))
    wa.grad = distribute_tensor(torch.zeros(4, 3), mesh, [Shard(0)])
    wb.grad = distribute_tensor(torch.zeros(4, 3), mesh, [Replicate()])
    vs = se.init_vectors([torch.zeros(4, 3)] * 2)
    v0 = [v.clone() for v in vs]
    with pytest.raises(ValueError, match=r"weights\[1\].grad must be a DTensor with the "
                       r"placements of weights\[1\]"):
        se.fused_step([wa, wb], vs, lam=1.0)
    assert not wa.grad.to_local().any() and all(map(torch.equal, vs, v0))
    # a regularizer over plain and sharded weights: every group is checked before any runs,
    # and the error names the weight (not its position in the group)
    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 4))
    net[1].weight = nn.Parameter(distribute_tensor(net[1].weight.detach(), mesh, [Shard(0)]))
    net[2].weight = nn.Parameter(distribute_tensor(net[2].weight.detach().reshape(4, 2, 2),
                                                   mesh, [Shard(2)]))
    net[2].weight.grad = None
    reg = se.SpectralNormRegularizer(net, lam=0.5)
    assert reg.active_backend == "distributed"
    net[0].weight.grad = g0 = torch.zeros(4, 3)
    vs0 = [v.clone() for v in reg.vs()]
    for call in (reg.step, reg.penalty):
        with pytest.raises(ValueError, match=r"the sharded \(DTensor\) weights: "
                           r"weights\['2.weight'\] is sharded on tensor dim 2"):
            call()
        assert not g0.any() and all(map(torch.equal, reg.vs(), vs0))
    # the edge rules of spectral_ext.reference: a zero matrix gives sigma 0 and keeps v bit for
    # bit, in v's own dtype (a float64 v of a float32 layer is not rounded to float32)
    zero = distribute_tensor(torch.zeros(5, 3), mesh, [Shard(0)])
    v64 = torch.randn(3, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    keep = v64.clone()
    gz = torch.zeros_like(zero)
    sig = se.fused_step([zero], [v64], lam=0.5, grads=[gz])
    assert sig.tolist() == [0.0] and torch.equal(v64, keep)
    assert not gz.to_local().any()
    # conv_norm="operator" takes plain (or parametrized) conv weights only, and says so at the
    # first step, before any gradient is made
    conv = nn.Conv2d(3, 4, 3)
    conv.weight = nn.Parameter(distribute_tensor(conv.weight.detach(), mesh, [Shard(0)]))
    reg = se.SpectralNormRegularizer(conv, conv_norm="operator", input_sizes={"weight": (3, 5, 5)})
    with pytest.raises(TypeError, match=r"does not take sharded \(DTensor\) conv weights"):
        reg.step()
    assert conv.weight.grad is None


def test_unsupported_dtensor_inputs_are_refused_before_anything_changes():
    run_ranks(_bad_input, 2, timeout=120)


# ---- FSDP2 ------------------------------------------------------------------------------------

class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Linear(6, 10)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(10, 10), nn.GELU(), nn.Linear(10, 7))
                                     for _ in range(2)])
        self.proj = nn.ModuleList([nn.Linear(7, 10) for _ in range(2)])
        self.head = nn.Linear(10, 3)

    def forward(self, x):
        h = self.emb(x)
        for b, p in zip(self.blocks, self.proj):
            h = h + p(b(h))
        return self.head(h)


def _data(seed, steps, batch=8):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 6, generator=gen), torch.randint(0, 3, (batch,), generator=gen))
            for _ in range(steps)]


def _train(model, reg, params, data, rank=0, world=1, penalty=False):
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    for x, y in data:
        opt.zero_grad()
        xs = x.chunk(world)[rank]
        ys = y.chunk(world)[rank]
        loss = nn.functional.cross_entropy(model(xs), ys)
        if penalty:
            # FSDP2 averages gradients over ranks: every rank adds the whole penalty
            loss = loss + reg.penalty()
        loss.backward()
        if not penalty:
            reg.step()
        opt.step()


def _fsdp2(rank, world, seed, out_path, penalty):
    from torch.distributed.fsdp import fully_shard
    torch.manual_seed(seed)
    model = _Tiny()
    reg = se.SpectralNormRegularizer(model, lam=0.05, seed=2)     # built BEFORE sharding
    for b in model.blocks:
        fully_shard(b)
    fully_shard(model)
    assert type(model.emb.weight).__name__ == "DTensor" or hasattr(model.emb.weight, "placements")
    data = _data(seed, 4)
    _train(model, reg, model.parameters(), data, rank, world, penalty)
    # the regularizer followed fully_shard: its weights are the model's sharded parameters
    assert all(a is b for a, b in zip(reg.weights, [dict(model.named_parameters())[n]
                                                    for n in reg.names]))
    full = {n: p.full_tensor() for n, p in model.named_parameters()}
    sig = reg.sigmas()
    exact = reg.exact_sigmas()
    if rank == 0:
        torch.save({"params": full, "sigma": sig, "exact": exact, "vs": reg.vs()}, out_path)


@pytest.mark.parametrize("penalty", [False, True], ids=["step", "penalty"])
def test_fsdp2_training_matches_a_single_process_run(penalty):
    """FSDP2 on 2 ranks, each half the batch, against the unsharded model on the whole batch in
    one process: same parameters, sigmas and vectors within float32 rounding."""
    seed = SEED % 10000
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "fsdp.pt")
        run_ranks(_fsdp2, 2, seed, path, penalty, timeout=180)
        got = torch.load(path)
    torch.manual_seed(seed)
    model = _Tiny()
    reg = se.SpectralNormRegularizer(model, lam=0.05, seed=2)
    _train(model, reg, model.parameters(), _data(seed, 4), penalty=penalty)
    for n, p in model.named_parameters():
        assert_rel_close(got["params"][n], p.detach(), 1e-4, n)
    assert_rel_close(got["sigma"], reg.sigmas(), 1e-4, "sigma")
    for a, b in zip(got["vs"], reg.vs()):
        assert_rel_close(a, b, 1e-4, "v")


# ---- DDP ----------------------------------------------------------------------------------------

def _ddp(rank, world, seed, out_path):
    from torch.nn.parallel import DistributedDataParallel as DDP
    torch.manual_seed(seed)
    model = _Tiny()
    ddp = DDP(model)
    reg = se.SpectralNormRegularizer(ddp, lam=0.05)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(seed + rank)      # each rank its own data
    for _ in range(20):
        opt.zero_grad()
        for micro in range(2):                              # gradient accumulation
            x, y = torch.randn(4, 6, generator=gen), torch.randint(0, 3, (4,), generator=gen)
            if micro == 0:
                with ddp.no_sync():
                    nn.functional.cross_entropy(ddp(x), y).backward()
            else:
                nn.functional.cross_entropy(ddp(x), y).backward()
        reg.step()                                          # once, after the synchronized pass
        opt.step()
    state = torch.cat([p.detach().reshape(-1) for p in model.parameters()] + reg.vs())
    gathered = [torch.empty_like(state) for _ in range(world)]
    dist.all_gather(gathered, state)
    for other in gathered[1:]:
        assert torch.equal(gathered[0], other), "DDP ranks diverged"
    if rank == 0:
        torch.save(reg.names, out_path)


def test_ddp_ranks_stay_bit_identical_with_no_sync_accumulation():
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "names.pt")
        run_ranks(_ddp, 2, SEED % 10000, path, timeout=180)
        names = torch.load(path)
    assert names[0] == "module.emb.weight"


# ---- checkpoints ------------------------------------------------------------------------------

def _dcp(rank, world, seed, ckpt_dir):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.fsdp import fully_shard

    def make():
        torch.manual_seed(seed)
        model = _Tiny()
        fully_shard(model)
        reg = se.SpectralNormRegularizer(model, lam=0.05, seed=2)   # built AFTER sharding
        return model, reg

    data = _data(seed, 6)
    model, reg = make()
    _train(model, reg, model.parameters(), data[:3], rank, world)
    dcp.save({"model": model.state_dict(), "reg": reg.state_dict()}, checkpoint_id=ckpt_dir)
    if rank == 0:
        torch.save(reg.state_dict(), os.path.join(ckpt_dir, "reg_rank0.pt"))   # plain torch.save
    _train(model, reg, model.parameters(), data[3:], rank, world)
    model2, reg2 = make()
    state = {"model": model2.state_dict(), "reg": reg2.state_dict()}
    dcp.load(state, checkpoint_id=ckpt_dir)
    model2.load_state_dict(state["model"])
    reg2.load_state_dict(state["reg"])
    at_checkpoint = [v.clone() for v in reg2.vs()]
    _train(model2, reg2, model2.parameters(), data[3:], rank, world)
    for (n, a), b in zip(model.named_parameters(), model2.parameters()):
        assert torch.equal(a.to_local(), b.to_local()), f"{n} differs after resuming (DCP)"
    assert all(torch.equal(a, b) for a, b in zip(reg.vs(), reg2.vs()))
    # the regularizer's state is replicated: rank 0's plain torch.save restores every rank
    dist.barrier()
    _, reg3 = make()
    reg3.load_state_dict(torch.load(os.path.join(ckpt_dir, "reg_rank0.pt")))
    assert all(torch.equal(a, b) for a, b in zip(reg3.vs(), at_checkpoint))


def test_dcp_checkpoint_resumes_a_sharded_run_bit_identically():
    with tempfile.TemporaryDirectory() as d:
        run_ranks(_dcp, 2, SEED % 10000, d, timeout=180)


# ---- tensor parallel ----------------------------------------------------------------------------

def _tp(rank, world, seed):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel,
                                                   parallelize_module)
    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 5))
    ref = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 5))
    ref.load_state_dict(model.state_dict())
    reg = se.SpectralNormRegularizer(model, lam=0.2)             # built before parallelizing
    r_ref = se.SpectralNormRegularizer(ref, lam=0.2, backend="reference")
    # colwise: weight 10 x 6 sharded on dim 0; rowwise: weight 5 x 10 sharded on dim 1
    parallelize_module(model, mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})
    assert [tuple(w.placements)[0].dim for w in reg.weights] == [0, 1]
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(seed))
    model(x).square().sum().backward()
    ref(x).square().sum().backward()
    assert_rel_close(reg.step(), r_ref.step(), 1e-5, "sigma")
    for w, wr in zip(reg.weights, r_ref.weights):
        assert_rel_close(w.grad.full_tensor(), wr.grad, 1e-5, "grad")


def test_tensor_parallel_rowwise_and_colwise():
    run_ranks(_tp, 2, SEED % 10000, timeout=120)


def test_fsdp2_example_runs_with_torchrun():
    """examples/train_fsdp2.py, as the README runs it (a few steps)."""
    import subprocess
    import sys
    example = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "examples", "train_fsdp2.py")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    with tempfile.TemporaryDirectory() as cwd:    # not the source tree: the installed package
        out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                              "--nproc-per-node", "2", example, "--steps", "3"],
                             capture_output=True, text=True, timeout=180, env=env, cwd=cwd)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "2 all-reduces" in out.stdout and "head.weight" in out.stdout, out.stdout
