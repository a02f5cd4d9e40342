"""The gemm backend (spinal_ops/gemm.py): what is specific to it. Its values and gradients against the reference are
in the conformance matrix (tests/test_conformance.py), its ops in tests/test_opcheck.py."""

from __future__ import annotations

import pytest
import torch
from helpers import Case, check_against_reference, functional_kwargs, make_inputs, require_backend, unread_columns

import spinal_ops
from spinal_ops import gemm, gpu_model
from spinal_ops.configs import CONFIG_BY_NAME


def test_dx_plan_first_writes_and_gaps():
    T, F = True, False
    # alternate halves, twice each: the first two products write their columns, the next two add
    assert gemm._dx_plan((0, 8, 0, 8), 8, 16) == (((T,), (T,), (F,), (F,)), ())
    # alternate with K * c < D: column 12 of 13 is read by no chunk and is zeroed
    assert gemm._dx_plan((0, 4, 8, 0), 4, 13) == (((T,), (T,), (T,), (F,)), ((12, 1),))
    # chunks with a hole before the first and between: zeroed ranges in column order
    assert gemm._dx_plan((2, 9), 3, 14) == (((T,), (T,)), ((0, 2), (5, 4), (12, 2)))
    # a wrapping chunk is two column ranges; disjoint from the others, both are first writes
    assert gemm._pieces(6, 4, 8) == ((6, 2, 0), (0, 2, 2))
    assert gemm._dx_plan((6, 2), 4, 8) == (((T, T), (T,)), ())
    # chunks that overlap partly (a cyclic split with c not dividing D): every product adds into zeros
    assert gemm._dx_plan((0, 4, 8, 12), 5, 13) == (((F,), (F,), (F,), (F, F)), ((0, 13),))
    assert gemm._dx_plan((0, 3), 4, 7) == (((F,), (F,)), ((0, 7),))


@pytest.mark.parametrize("case", [
    Case(6, 13, 3, 4, 4, split_mode="alternate"),  # column 12 read by no chunk: its gradient is zero
    Case(6, 16, 3, 4, 5, split_mode="alternate", tie=(0, 1, 2, 1, 2), activation="gelu"),  # c = 5: column 15, tied
], ids=["gap", "gaps-tied"])
def test_uncovered_columns_have_zero_gradient(case):
    require_backend("gemm")
    check_against_reference("gemm", case, torch.float64)
    x, params = make_inputs(case, torch.float64)
    with spinal_ops.use_backend("gemm"):
        out = spinal_ops.spinal_linear(x, **params, **functional_kwargs(case))
    (dx,) = torch.autograd.grad(out.sum(), [x])
    unread = unread_columns(case)
    assert unread and torch.equal(dx[:, unread], torch.zeros_like(dx[:, unread]))


def _op_names(ops):
    return [op.name.split(".")[1] for op in ops]


@pytest.mark.parametrize("name", ["wide-resnet-head", "regression"])
def test_one_call_per_product_and_no_copies(name):
    """The gemm plan as the cost model records it (its own functions on meta tensors): the forward is one GEMM per
    product written in place (L input projections, L - 1 recurrent products, the head) and one in-place
    activation per sub-layer, nothing else; the backward adds one GEMM per product again (the head's two, the
    carries, the weight gradients, dx) and no copies."""
    cfg = CONFIG_BY_NAME[name]
    L = cfg.num_layers
    forward = _op_names(gpu_model.eager_ops("gemm", cfg, 8, "forward", "fp32"))
    gemms = [n for n in forward if n in ("mm", "addmm", "addmm_")]
    assert len(gemms) == 2 * L, forward
    activation = "leaky_relu_" if cfg.activation == "leaky_relu" else "relu_"
    assert [n for n in forward if n not in ("mm", "addmm", "addmm_")] == [activation] * L, forward
    train = _op_names(gpu_model.eager_ops("gemm", cfg, 8, "fwd+bwd", "fp32"))
    backward = train[len(forward):]
    # dH = G Wo, dWo = G^T H; L - 1 carries; L dWx, L - 1 dWh, L dx products
    assert sum(n in ("mm", "addmm", "addmm_") for n in backward) == 2 + (L - 1) + L + (L - 1) + L, backward
    assert not {"cat", "clone", "copy_", "index_add_", "index_select", "arange"} & set(train), train


def test_refuses_bad_arguments_naming_the_backend():
    require_backend("gemm")
    m = spinal_ops.SpinalLinear(12, 3, layer_width=4, num_layers=3)
    x = torch.randn(5, 12)
    args = (x, m.weight_x.detach(), m.weight_h.detach(), m.bias.detach(), m.head_weight.detach()[:, :-1],
            m.head_bias.detach(), m._spec.starts, m._spec.slot_list, "relu", 0.01)
    with pytest.raises(RuntimeError, match=r"spinal_ops gemm backend: head_weight must have shape \[3, 12\], "
                                           r"got \[3, 11\]"):
        torch.ops.spinal_ops.spinal_forward_gemm(*args)


def test_compile_fullgraph_traces_the_gemm_ops():
    """Under ``torch.compile(fullgraph=True)`` the layer is one gemm op in the graph (fake kernel, no graph break),
    with the eager values and gradients."""
    require_backend("gemm")
    torch._dynamo.reset()
    m = spinal_ops.SpinalLinear(20, 5, layer_width=7, num_layers=3, num_splits=3, activation="gelu")
    x = torch.randn(8, 20)
    targets = []

    def recording(gm, example_inputs):
        targets.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    with spinal_ops.use_backend("gemm"):
        eager = m(x)
        (g_eager,) = torch.autograd.grad(eager.square().sum(), [m.weight_x])
        compiled = torch.compile(m, fullgraph=True, backend=recording)
        got = compiled(x)
    (g_got,) = torch.autograd.grad(got.square().sum(), [m.weight_x])
    assert any("spinal_forward_gemm" in t for t in targets), targets
    assert torch.equal(got, eager) and torch.equal(g_got, g_eager)


@pytest.mark.parametrize("mode", ["forward", "fwd+bwd"])
def test_model_records_the_calls_the_backend_makes(mode):
    """The cost model's gemm plan (recorded on meta tensors) is the list of calls the gemm functions make on real
    tensors: the same ops with the same GEMM shapes, in order."""
    cfg = CONFIG_BY_NAME["vgg-head"]._replace(in_features=64, width=12)
    rows = 5
    modelled = [(op.name, op.gemm) for op in gpu_model.eager_ops("gemm", cfg, rows, mode, "fp32")]
    m = spinal_ops.SpinalLinear(cfg.in_features, cfg.out, layer_width=cfg.width, num_layers=cfg.num_layers,
                                num_splits=cfg.num_splits, activation=cfg.activation)
    spec, x = m._spec, torch.randn(rows, cfg.in_features)
    params = [p.detach() for p in (m.weight_x, m.weight_h, m.bias, m.head_weight, m.head_bias)]
    hyper = (spec.starts, spec.slot_list, spec.activation, spec.negative_slope)
    grad_y = torch.ones(rows, cfg.out)

    def run(state):
        h_all, _ = gemm.spinal_forward_gemm(x, *params, *hyper)
        if mode == "fwd+bwd":
            gemm.spinal_backward_gemm(grad_y, None, x, h_all, *params[:4], *hyper, [True] * 6)

    ran = [(op.name, op.gemm) for op in gpu_model._record_ops(run)]
    assert ran == modelled
