"""The CUDA kernel sources of csrc/cuda, executed on the CPU under the SIMT emulator (csrc/cuda/simt.h).

Every kernel variant (dtype, activation, fast and general width path, tensor-core and FMA paths, shared
weights, head and hidden, both split modes, wrap-around chunks) is compared with ``reference.py``, forward
and every gradient, under the forward, reverse and random thread schedules of the emulator. Launch counts
come from the emulator; planted bugs prove that it catches a missing ``__syncthreads`` and an early return.
"""

from __future__ import annotations

import pathlib
import sys

import pytest
import torch
from helpers import CASES, assert_close
from kernel_paths import (
    GRAD_NAMES,
    PARAM_NAMES,
    VARIANTS,
    Variant,
    check_variant,
    cotangents,
    hyper,
    inputs,
    reference_grads,
)
from original import TiedRegressionSpinal, packed_grads

from spinal_ops import SpinalLinear, gpu_model

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent / "cuda_emulated"))
import build  # noqa: E402  (tests/cuda_emulated/build.py)

pytestmark = [
    pytest.mark.emulated,
    pytest.mark.skipif(not build.cuda_headers_available(), reason="the CUDA toolkit headers are not installed"),
]

SCHEDULES = {"forward": 0, "reverse": 1, "random": 2}
_wrap, _alternate, _empty, _b257, _k8, _l1, _shared, _gelu, _silu, _identity, _tied = (
    CASES[n] for n in ("wrap", "alternate", "empty", "b257", "k8", "l1", "shared", "gelu-hidden", "silu-transposed",
                       "identity-3d", "tied"))


@pytest.fixture(scope="module")
def emu():
    return build.load()


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.id)
def test_forward_and_gradients_match_reference(emu, variant: Variant, schedule: str):
    emu.set_schedule(SCHEDULES[schedule], 1234)
    check_variant(emu.forward, emu.backward, variant, f"cuda (emulated, {schedule} schedule) {variant.id}")


def backward_launches(mask, rows: int) -> int:
    """The backward's launches for an output mask (x, weight_x, weight_h, bias, head_weight, head_bias): the chain
    kernel when dx or an input / recurrent weight or bias gradient is asked for, the weights kernel when any
    parameter gradient is, and its reduce kernel when the batch is split into pieces (more than 128 rows)."""
    return int(any(mask[:4])) + int(any(mask[1:])) * (2 if gpu_model.cuda_weight_pieces(rows) > 1 else 1)


@pytest.mark.parametrize("mask", [(True, False, False, False, False, False), (False, True, True, True, False, False),
                                  (False, False, False, False, True, True)], ids=["dx", "input-weights", "head"])
def test_backward_honours_output_mask_and_counts_launches(emu, mask):
    case = _wrap
    x, params, starts = inputs(case, torch.float64)
    grad_y = torch.rand(x.shape[0], case.out, dtype=torch.float64)
    emu.set_schedule(0, 0)
    before = emu.launch_count()
    H, _ = emu.forward(x, *[params[k] for k in PARAM_NAMES], *hyper(case, starts), 0, False)
    assert emu.launch_count() - before == 1, f"cuda (emulated) {case.id}: forward must be one launch"
    before = emu.launch_count()
    grads = emu.backward(grad_y, None, x, H, params["weight_x"], params["weight_h"], params["bias"],
                         params["head_weight"], *hyper(case, starts), list(mask))
    launches = emu.launch_count() - before
    expected = backward_launches(mask, x.shape[0])
    assert launches == expected, f"cuda (emulated) {case.id} mask {mask}: {launches} launches, expected {expected}"
    _, _, ref = reference_grads(case, x, params, starts, torch.float64, (None, grad_y))
    for name, wanted, got, hi in zip(GRAD_NAMES, mask, grads, ref, strict=True):
        if wanted:
            assert_close(got, hi, what=f"cuda (emulated) {case.id}: d{name} with mask {mask}")
        else:
            assert got.numel() == 0, f"cuda (emulated) {case.id}: d{name} not asked for, got {tuple(got.shape)}"


@pytest.mark.parametrize("variant", [Variant(_wrap, torch.float32), Variant(_gelu.replace(rows=40), torch.float16),
                                     Variant(_wrap.replace(rows=129), torch.float32)], ids=lambda v: v.id)
def test_launch_counts_full_backward(emu, variant):
    case = variant.case
    x, params, starts = inputs(case, variant.dtype)
    before = emu.launch_count()
    H, _ = emu.forward(x, *[params[k] for k in PARAM_NAMES], *hyper(case, starts), 0, False)
    assert emu.launch_count() - before == 1, f"cuda (emulated) {variant.id}: forward launches"
    grad_h, grad_y = cotangents(case, x, params, variant.dtype)
    before = emu.launch_count()
    emu.backward(grad_y, grad_h, x, H, params["weight_x"], params["weight_h"], params["bias"], params["head_weight"],
                 *hyper(case, starts), [True] * 6)
    launches = emu.launch_count() - before
    expected = backward_launches([True] * 6, x.shape[0])
    assert launches == expected, f"cuda (emulated) {variant.id}: backward took {launches} launches, expected {expected}"


def test_empty_batch_gives_zero_weight_gradients(emu):
    case = _empty
    x, params, starts = inputs(case, torch.float32)
    before = emu.launch_count()
    H, y = emu.forward(x, *[params[k] for k in PARAM_NAMES], *hyper(case, starts), 0, False)
    assert emu.launch_count() == before, f"cuda (emulated) {case.id}: an empty batch launches nothing"
    assert H.shape == (0, case.num_layers * case.width) and y.shape == (0, case.out), f"{case.id}: output shapes"
    grads = emu.backward(torch.zeros(0, case.out), None, x, H, params["weight_x"], params["weight_h"], params["bias"],
                         params["head_weight"], *hyper(case, starts), [True] * 6)
    for name, got, like in zip(GRAD_NAMES, grads, [x, *[params[k] for k in PARAM_NAMES]], strict=True):
        assert got.shape == like.shape, f"cuda (emulated) {case.id}: d{name} shape {tuple(got.shape)}"
        assert not got.any(), f"cuda (emulated) {case.id}: d{name} must be zero for an empty batch"


def test_bad_arguments_use_the_shared_checks(emu):
    case = _wrap
    x, params, starts = inputs(case, torch.float32)
    with pytest.raises(RuntimeError, match="weight_h must have shape"):
        emu.forward(x, params["weight_x"], params["weight_h"][:, :1], params["bias"], params["head_weight"],
                    params["head_bias"], *hyper(case, starts), 0, False)
    with pytest.raises(RuntimeError, match="activation must be one of"):
        emu.forward(x, *[params[k] for k in PARAM_NAMES], starts, list(case.slots), "swish", 0.01, 0, False)


def test_2_31_rows_are_refused_naming_the_limit_and_the_fallback(emu):
    """Rows are 32-bit indices in the kernels: 2^31 rows are refused before any launch. x (one column) is address
    space that is never touched."""
    try:
        x = torch.empty(2**31, 1)
    except RuntimeError as exc:  # e.g. vm.overcommit_memory = 2
        pytest.skip(f"cannot reserve 8 GiB of address space: {exc}")
    wx, wh, b = torch.zeros(1, 2, 1), torch.zeros(0, 2, 2), torch.zeros(1, 2)
    before = emu.launch_count()
    match = r"cuda backend: the number of rows of x \(B\) must be at most 2\^31 - 1.*got 2147483648.*reference"
    with pytest.raises((ValueError, RuntimeError), match=match):
        emu.forward(x, wx, wh, b, None, None, [0], [0], "relu", 0.01, 0, False)
    assert emu.launch_count() == before, "cuda (emulated): a refused call must launch nothing"


def test_no_host_to_device_copy_per_call(emu):
    """The (starts, slots) table is uploaded once per distinct table, then reused: a repeated forward and backward
    copies nothing to the device; another tying pattern uploads its own table once."""
    case = _tied.replace(rows=5)
    x, params, starts = inputs(case, torch.float32)
    p = [params[k] for k in PARAM_NAMES]

    def step(c):
        H, y = emu.forward(x, *p, *hyper(c, starts), 0, False)
        emu.backward(torch.ones_like(y), None, x, H, *p[:4], *hyper(c, starts), [True] * 6)

    step(case)
    before = emu.layer_table_uploads()
    for _ in range(3):
        step(case)
    assert emu.layer_table_uploads() == before, "cuda (emulated): a repeated call uploaded its layer table again"
    step(case.replace(tie=(0, 1, 2, 3, 3, 2)))
    assert emu.layer_table_uploads() == before + 1, "cuda (emulated): a new table must be uploaded exactly once"


def test_tied_regression_original_matches(emu):
    """The original regression net (fc1, fc2, fc3, fc4, fc3, fc4) through the emulated kernels: the weight gradients
    of its tied modules add up over the sub-layers that use them."""
    torch.manual_seed(5)
    orig = TiedRegressionSpinal(4, 50, 1).double()
    layers, head = orig.linears()
    port = SpinalLinear.from_linears(8, layers, head, split_mode="alternate", activation="leaky_relu")
    x = torch.randn(19, 8, dtype=torch.float64)
    xo = x.clone().requires_grad_()
    y = orig(xo)
    cot = torch.randn_like(y)
    y.backward(cot)
    params = [getattr(port, k).detach() for k in PARAM_NAMES]
    hyper = (port._spec.starts, port._spec.slot_list, "leaky_relu", 0.01)
    H, y_emu = emu.forward(x, *params, *hyper, 0, False)
    assert_close(y_emu, y.detach(), what="cuda (emulated) tied regression: output")
    grads = emu.backward(cot, None, x, H, *params[:4], *hyper, [True] * 6)
    expected = {"x": xo.grad, **packed_grads(layers, head, port.chunk)}
    for name, got in zip(GRAD_NAMES, grads, strict=True):
        what = f"cuda (emulated) tied regression: d{name}"
        assert_close(got, expected[name], what=what)


# ------------------------------------------------------------------------------------------- planted bugs


def test_emulator_catches_a_missing_syncthreads(emu):
    values = torch.arange(256, dtype=torch.float32) % 7
    expected = values.reshape(2, 128).sum(1)
    results = {}
    for name, code in SCHEDULES.items():
        emu.set_schedule(code, 99)
        good = emu.planted_block_sum(False, values)
        assert torch.equal(good, expected), f"emulator: correct block sum wrong under the {name} schedule: {good}"
        results[name] = emu.planted_block_sum(True, values)
    wrong = [name for name, got in results.items() if not torch.equal(got, expected)]
    assert wrong, f"emulator: a missing __syncthreads went unnoticed under every schedule: {results}"


def test_emulator_catches_an_early_return_before_a_barrier(emu):
    emu.set_schedule(0, 0)
    full = emu.planted_early_return(128)
    assert torch.equal(full, (torch.arange(128) + 1).remainder(128).float()), "emulator: planted kernel without bug"
    with pytest.raises(RuntimeError, match="different numbers of __syncthreads"):
        emu.planted_early_return(64)
