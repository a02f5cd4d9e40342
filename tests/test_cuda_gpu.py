"""The `cuda` backend on a real GPU: the fused CUDA kernels of spinal_ops._C against the reference.

Collected everywhere, run only where a GPU is: the module is skipped at collection time when the machine has
no NVIDIA device node (a file-system check: CUDA itself is never queried at import or collection), and each
test re-checks ``torch.cuda.is_available()`` when it runs.
"""

from __future__ import annotations

import os

import pytest
import torch
from helpers import CASES, assert_close, functional_kwargs, make_inputs, run_and_grad

import spinal_ops

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not os.path.exists("/dev/nvidiactl"), reason="no NVIDIA GPU on this machine"),
]

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def _gpu():
    if not torch.cuda.is_available():
        pytest.skip("CUDA is not available to torch")
    if "cuda" not in spinal_ops.available_backends():
        pytest.skip("spinal_ops._C was built without the CUDA kernels")


def _params_to(params, device):
    return {k: (v.detach().to(device).requires_grad_() if v is not None else None) for k, v in params.items()}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_cuda_backend_matches_reference(case, dtype):
    x, params = make_inputs(case, dtype)
    xd = x.detach().to("cuda").requires_grad_()
    pd = _params_to(params, "cuda")
    kw = functional_kwargs(case)
    with spinal_ops.use_backend("cuda"):
        out, grads = run_and_grad(lambda x, **p: spinal_ops.spinal_linear(x, **p, **kw), xd, pd)
    x64, p64 = make_inputs(case, torch.float64)
    with spinal_ops.use_backend("reference"):
        out_hi, grads_hi = run_and_grad(lambda x, **p: spinal_ops.spinal_linear(x, **p, **kw), x64, p64)
        out_lo, grads_lo = run_and_grad(lambda x, **p: spinal_ops.spinal_linear(x, **p, **kw), x, params)
    what = f"cuda backend {case.id} {dtype}"
    assert_close(out.cpu(), out_hi, out_lo, what=f"{what}: output")
    for name in grads_hi:
        assert_close(grads[name].cpu(), grads_hi[name], grads_lo[name], what=f"{what}: d{name}")


def test_cuda_backend_is_chosen_for_cuda_tensors():
    assert spinal_ops.backends.select_backend(torch.device("cuda")) == "cuda"


@pytest.mark.parametrize("case", [CASES[0], CASES[7]], ids=lambda c: c.id)
def test_cuda_op_passes_opcheck(case):
    x, params = make_inputs(case, torch.float32, device="cuda")
    args = (x.detach().reshape(-1, case.in_features).contiguous(),
            *[params[k] for k in ("weight_x", "weight_h", "bias", "head_weight", "head_bias")],
            *case.layer_args(), case.activation, case.negative_slope)
    torch.library.opcheck(torch.ops.spinal_ops.spinal_forward, args)
