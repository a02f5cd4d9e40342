"""SpinalLinear in distributed training (DDP over gloo, 2 CPU processes) and through ``torch.export``."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from helpers import assert_close
from torch import nn

import spinal_ops
from spinal_ops import SpinalLinear

WORLD = 2


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 12), nn.ReLU(), SpinalLinear(12, 4, layer_width=5, num_splits=3)).double()


def _ddp_worker(rank: int, init_file: str, x: torch.Tensor, target: torch.Tensor, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        model = _model()
        ddp = nn.parallel.DistributedDataParallel(model)
        rows = x.shape[0] // WORLD
        mine = slice(rank * rows, (rank + 1) * rows)
        F.cross_entropy(ddp(x[mine]), target[mine]).backward()
        torch.save({name: p.grad for name, p in model.named_parameters()}, f"{out_dir}/grads{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_gradients_equal_a_single_process(tmp_path):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(12, 10, generator=g, dtype=torch.float64)
    target = torch.randint(0, 4, (12,), generator=g)
    mp.spawn(_ddp_worker, args=(str(tmp_path / "init"), x, target, str(tmp_path)), nprocs=WORLD, join=True)

    model = _model()
    F.cross_entropy(model(x), target).backward()  # the mean over the whole batch = mean of the halves' means
    expected = {name: p.grad for name, p in model.named_parameters()}
    assert any(name.startswith("2.weight_x") for name in expected)
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"grads{rank}.pt")
        assert set(got) == set(expected), f"rank {rank}: parameters {sorted(got)} != {sorted(expected)}"
        for name, ref in expected.items():
            assert_close(got[name], ref, what=f"DDP rank {rank} grad {name} vs single process")


def _export_models():
    plain = nn.Sequential(nn.Linear(10, 12), nn.ReLU(), SpinalLinear(12, 4, layer_width=5, num_splits=3))
    vgg = nn.Sequential(nn.Linear(10, 12), nn.ReLU(), SpinalLinear(12, 4, layer_width=5, dropout=0.5, batch_norm=True))
    with torch.no_grad():
        for n in vgg[2].norms:
            n.running_mean.uniform_(-0.5, 0.5)
            n.running_var.uniform_(0.5, 2.0)
    return {"plain": plain, "dropout-batchnorm-eval": vgg}


@pytest.mark.parametrize("name", sorted(_export_models()))
def test_export_round_trip(name, tmp_path):
    model = _export_models()[name].eval()
    x = torch.randn(6, 10)
    batch = torch.export.Dim("batch")
    program = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert "spinal_ops.spinal_forward.default" in targets, f"{name}: the fused op is not in the graph: {targets}"
    path = tmp_path / "model.pt2"
    torch.export.save(program, path)
    loaded = torch.export.load(path)
    for rows in (6, 3):
        xr = torch.randn(rows, 10)
        expected = model(xr)
        assert_close(program.module()(xr), expected, what=f"{name}: exported program, batch {rows}")
        assert_close(loaded.module()(xr), expected, what=f"{name}: saved and loaded program, batch {rows}")


def test_export_under_the_reference_backend_traces_plain_ops():
    model = _export_models()["plain"].eval()
    x = torch.randn(6, 10)
    with spinal_ops.use_backend("reference"):
        program = torch.export.export(model, (x,))
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert not any(t.startswith("spinal_ops.") for t in targets), f"custom ops in a reference-backend graph: {targets}"
    assert_close(program.module()(x), model(x), what="reference-backend export")
