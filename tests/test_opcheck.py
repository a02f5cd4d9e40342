"""``torch.library.opcheck`` for every op, from one list of samples: the native forward and backward
(``spinal_forward``, ``_spinal_backward``) on CPU and CUDA tensors, the Triton forward and backward
(``spinal_forward_triton``, ``_spinal_backward_triton``), the cpu kernels' product op (``_cpu_gemm``) and their small
ops (``_scale_rows_backward_inplace``, ``_dropout_noise_``). opcheck tests the schema (no undeclared mutation or
aliasing), the autograd registration, the fake (meta) kernels and AOT dispatch with dynamic shapes.

A backward sample is built from the reference forward (so every backward op sees the same H), once with plain
inputs for each output mask and once with inputs that require grad (the backward's own derivative, used by double
backward). After opcheck, each backward op's output mask is checked: asked-for gradients have their tensor's
shape, the others are empty.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import CASES, Case, backends, device_of, make_inputs, require_backend, triton_ops

import spinal_ops
from spinal_ops import reference

PARAMS = ("weight_x", "weight_h", "bias", "head_weight", "head_bias")
# opcheck needs contiguous x (the ops require it; spinal_linear makes it so)
OPCHECK_CASES = [CASES["wrap"], CASES["shared"], CASES["gelu-hidden"],
                 CASES["silu-transposed"].replace(layout="contiguous"), CASES["tied"]]
# with inputs that require grad (opcheck then traces the backward's own derivative: ~20 s a sample on a CPU)
GRAD_CASES = [CASES["wrap"], CASES["gelu-hidden"], CASES["tied"]]
MASKS = {"all": [True] * 6, "dx": [True] + [False] * 5, "weights": [False] + [True] * 5}


@dataclasses.dataclass(frozen=True)
class Sample:
    """One opcheck sample: a case, the op kind it is for, an output mask (backward) and whether the tensors
    require grad."""

    case: Case
    kind: str  # "forward" or "backward"
    mask: str = "all"
    grad: bool = False

    @property
    def id(self) -> str:
        return f"{self.case.id}-{self.kind}" + (f"-{self.mask}" if self.kind == "backward" else "") + \
            ("-grad" if self.grad else "")


SAMPLES = [
    *(Sample(c, "forward", grad=g) for c in OPCHECK_CASES for g in (True, False)),
    *(Sample(c, "backward", mask=m) for c in OPCHECK_CASES for m in MASKS),
    *(Sample(c, "backward", grad=True) for c in GRAD_CASES),  # mask "all" as given: [True] * 6
]

# (backend, op name, kind): every op, on the device its backend runs here
OPS = [
    ("cpu", "spinal_forward", "forward"),
    ("cpu", "_spinal_backward", "backward"),
    ("triton", "spinal_forward_triton", "forward"),
    ("triton", "_spinal_backward_triton", "backward"),
    ("gemm", "spinal_forward_gemm", "forward"),
    ("gemm", "_spinal_backward_gemm", "backward"),
    ("cuda", "spinal_forward", "forward"),
    ("cuda", "_spinal_backward", "backward"),
]
# float64 on CPU tensors; float32 on the GPU (its common dtype there)
DTYPE = {"cpu": torch.float64, "cuda": torch.float32}
SEED = 8  # of the samples' inputs


def _params():
    for backend, op, kind in OPS:
        (param,) = backends(backend)
        for sample in SAMPLES:
            if sample.kind == kind:
                yield pytest.param(backend, op, sample, marks=param.marks, id=f"{backend}-{op}-{sample.id}")


def make_sample(sample: Sample, device: str, dtype: torch.dtype | None = None) -> tuple:
    """The op arguments of a sample on ``device`` (in ``dtype``; default: :data:`DTYPE`'s for the device)."""
    case, dtype = sample.case, dtype or DTYPE[device]
    x, params = make_inputs(case, dtype, device=device, seed=SEED)
    p = [params[k] for k in PARAMS]
    if not sample.grad:
        x, p = x.detach(), [t.detach() if t is not None else None for t in p]
    starts, slots = case.layer_args()
    hyper = (starts, slots, case.activation, case.negative_slope)
    if sample.kind == "forward":
        return (x, *p, *hyper)
    with torch.no_grad():
        H, y = reference.spinal_forward(x, *p, *hyper)
    g = torch.Generator().manual_seed(9)
    grad_y = torch.rand(y.shape, generator=g, dtype=dtype).to(device) if case.head else None
    grad_h = torch.rand(H.shape, generator=g, dtype=dtype).to(device)
    if sample.grad:
        grad_y = grad_y.requires_grad_() if grad_y is not None else None
        grad_h, H = grad_h.requires_grad_(), H.requires_grad_()
        mask = list(MASKS[sample.mask])
    else:
        mask = [m and t is not None for m, t in zip(MASKS[sample.mask], (x, *p), strict=True)]
    return (grad_y, grad_h, x, H, *p[:4], *hyper, mask)


@pytest.mark.parametrize("backend,op,sample", list(_params()))
def test_opcheck(backend, op, sample):
    require_backend(backend)
    if backend == "cuda" and not torch.cuda.is_available():
        pytest.skip("CUDA is not available to torch")
    ops = triton_ops() if backend == "triton" else torch.ops.spinal_ops
    overload = getattr(ops, op).default
    args = make_sample(sample, device_of(backend))
    utils = ["test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"]
    if backend == "triton" and spinal_ops.backends.triton_interpreted():
        utils.remove("test_aot_dispatch_dynamic")  # traces through FakeTensors: the interpreter needs data pointers
    torch.library.opcheck(overload, args, test_utils=utils)
    _check_masked_gradients(backend, op, sample, overload, args)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("sample", [s for s in SAMPLES if s.case is CASES["wrap"] and not s.grad], ids=lambda s: s.id)
def test_opcheck_cpu_reduced_precision(sample, dtype):
    """The cpu ops widen bfloat16/float16 to float32 and round the results back: still fresh tensors of the
    input's dtype (no aliasing), honouring the output mask."""
    require_backend("cpu")
    op = "spinal_forward" if sample.kind == "forward" else "_spinal_backward"
    overload = getattr(torch.ops.spinal_ops, op).default
    args = make_sample(sample, "cpu", dtype)
    torch.library.opcheck(overload, args, test_utils=["test_schema", "test_autograd_registration",
                                                      "test_faketensor", "test_aot_dispatch_dynamic"])
    for out in overload(*args):
        assert out.dtype == dtype, f"{op} {sample.id}: result in {out.dtype}"
    _check_masked_gradients("cpu", op, sample, overload, args)


def _check_masked_gradients(backend, op, sample, overload, args):
    if sample.kind == "backward":
        grads = overload(*args)
        what = f"{backend} {op} {sample.id}"
        # the sample's own tensors, head_bias included (the backward ops do not take it)
        x, params = make_inputs(sample.case, args[2].dtype, device=args[2].device, seed=SEED)
        tensors = (x, *[params[k] for k in PARAMS])
        for name, wanted, g, t in zip(("x", *PARAMS), args[-1], grads, tensors, strict=True):
            if not wanted or t is None:
                assert g.numel() == 0, f"{what}: d{name} not asked for or absent, got shape {tuple(g.shape)}"
            else:
                assert g.shape == t.shape, f"{what}: d{name} has shape {tuple(g.shape)}, expected {tuple(t.shape)}"


@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (True, False), (False, True)], ids=["nn", "tn", "nt"])
def test_opcheck_cpu_gemm(trans_a, trans_b):
    require_backend("cpu")
    a = torch.randn(9, 7, dtype=torch.float64)
    b = torch.randn(7 if not trans_b else 5, 5 if not trans_b else 7, dtype=torch.float64)
    if trans_a:
        a = a.t().contiguous()
    torch.library.opcheck(torch.ops.spinal_ops._cpu_gemm.default, (a, b, trans_a, trans_b),
                          test_utils=["test_schema", "test_autograd_registration", "test_faketensor",
                                      "test_aot_dispatch_dynamic"])


def test_opcheck_scale_rows_backward():
    require_backend("cpu")
    grad, weight, scale = torch.randn(3, 4, 9, dtype=torch.float64), torch.randn(3, 4, 9, dtype=torch.float64), \
        torch.randn(3, 4, dtype=torch.float64)
    for scale_grad in (True, False):
        torch.library.opcheck(torch.ops.spinal_ops._scale_rows_backward_inplace.default,
                              (grad.clone(), weight, scale, scale_grad),
                              test_utils=["test_schema", "test_autograd_registration", "test_faketensor",
                                          "test_aot_dispatch_dynamic"])
        torch.library.opcheck(torch.ops.spinal_ops._scale_rows_backward_inplace.default,
                              (grad.clone(), weight, torch.randn(3, 9, dtype=torch.float64), scale_grad, True),
                              test_utils=["test_schema", "test_autograd_registration", "test_faketensor",
                                          "test_aot_dispatch_dynamic"])


def test_opcheck_dropout_noise():
    """The dropout-noise op, with a private seeded generator among its arguments (opcheck runs the op on copies of the
    arguments and compares the results). AOT dispatch from torch 2.15 on: torch 2.8's FX tracing refuses a Generator
    argument ("NotImplementedError: argument of type: <class 'torch._C.Generator'>")."""
    require_backend("cpu")
    utils = ["test_schema", "test_autograd_registration", "test_faketensor"]
    if tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 15):
        utils.append("test_aot_dispatch_dynamic")
    for dtype in (torch.float32, torch.float64):
        torch.library.opcheck(torch.ops.spinal_ops._dropout_noise_.default,
                              (torch.empty(5, 7, dtype=dtype), 0.3, torch.Generator().manual_seed(1)), test_utils=utils)
