"""What is specific to the fused C++ CPU backend: gradcheck, the backward op on its own, compile, saved tensors,
NaN rows, many rows, leading dims, dtypes and argument errors. Its outputs and gradients against the reference are
in tests/test_conformance.py, its opcheck in tests/test_opcheck.py."""

from __future__ import annotations

import copy
import math
import os
import pathlib
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import (
    CASES,
    GRADCHECK,
    Case,
    assert_close,
    check_against_reference,
    functional_kwargs,
    make_inputs,
    require_backend,
    run_case,
    unread_columns,
)
from torch.utils._python_dispatch import TorchDispatchMode

import spinal_ops
from spinal_ops import SpinalLinear, ops, reference

pytestmark = pytest.mark.usefixtures("_cpu_backend")


@pytest.fixture
def _cpu_backend():
    require_backend("cpu")


GRADCHECK_CASES = [
    Case(3, 7, 2, 3, 3, activation=act, head=head, shared=shared, negative_slope=0.3)
    for act in reference.ACTIVATIONS
    for head in (True, False)
    for shared in (False, True)
] + [Case(3, 7, 2, 3, 5, tie=(0, 1, 2, 1, 2), activation="tanh")]


@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=[c.id for c in GRADCHECK_CASES])
def test_gradcheck(case):
    x, params = make_inputs(case, torch.float64, seed=3)
    names = [k for k, v in params.items() if v is not None]

    def fn(x, *tensors):
        with spinal_ops.use_backend("cpu"):
            return spinal_ops.spinal_linear(x, **dict(zip(names, tensors, strict=False)), **functional_kwargs(case))

    assert torch.autograd.gradcheck(fn, (x, *[params[n] for n in names]), **GRADCHECK)


def _op_args(case, dtype=torch.float64):
    x, p = make_inputs(case, dtype)
    starts, slots = case.layer_args()
    return (x.detach().requires_grad_(), p["weight_x"], p["weight_h"], p["bias"], p["head_weight"], p["head_bias"],
            starts, slots, case.activation, case.negative_slope)


def test_backward_matches_reference_on_its_own():
    case = CASES["k8"]
    x, wx, wh, b, wo, bo, starts, slots, act, slope = _op_args(case)
    h_all, y = reference.spinal_forward(x, wx, wh, b, wo, bo, starts, slots, act, slope)
    grad_y, grad_h = torch.randn_like(y), torch.randn_like(h_all)
    expected = torch.autograd.grad((h_all, y), (x, wx, wh, b, wo, bo), (grad_h, grad_y))
    got = torch.ops.spinal_ops._spinal_backward(grad_y, grad_h, x.detach(), h_all.detach(), wx.detach(), wh.detach(),
                                               b.detach(), wo.detach(), starts, slots, act, slope, [True] * 6)
    names = ("x", "weight_x", "weight_h", "bias", "head_weight", "head_bias")
    for name, g, e in zip(names, got, expected, strict=False):
        assert_close(g, e, what=f"cpu backward op grad {name} (grad_y and grad_H both given)")


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Linear(6, 20)
        self.head = SpinalLinear(20, 5, layer_width=7, num_layers=3, num_splits=3, activation="gelu")

    def forward(self, x):
        return self.head(torch.relu(self.body(x)))


def test_compile_fullgraph_matches_eager(tmp_path, monkeypatch):
    # A private compile cache: the shared one (/tmp/torchinductor_<user>) may hold code compiled against another
    # build of spinal_ops whose ops had other names, which the cache key does not see.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch._dynamo.reset()
    net = _Net()
    compiled = torch.compile(net, fullgraph=True, backend="inductor")
    for rows in (8, 13):  # a new batch size after the first compile
        x = torch.randn(rows, 6)
        eager = net(x)
        (g_eager,) = torch.autograd.grad(eager.square().sum(), [net.head.weight_x])
        with spinal_ops.use_backend("cpu"):
            got = compiled(x)
        (g_got,) = torch.autograd.grad(got.square().sum(), [net.head.weight_x])
        assert_close(got.detach(), eager.detach(), what=f"compiled cpu forward rows={rows}")
        assert_close(g_got, g_eager, what=f"compiled cpu backward rows={rows}")


def test_saves_only_x_and_H():
    case = Case(33, 40, 2, 6, 5, out=4)
    x, params = make_inputs(case, torch.float32)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), spinal_ops.use_backend("cpu"):
        spinal_ops.spinal_linear(x, **params, **functional_kwargs(case))
    known = {x.data_ptr()} | {p.data_ptr() for p in params.values() if p is not None}  # views of x count as x
    extra = sum(t.numel() for t in saved if t.data_ptr() not in known)
    assert extra <= case.rows * case.num_layers * case.width, f"saved {extra} values beyond x and the weights"


def test_nan_stays_in_its_row():
    m = SpinalLinear(10, 3, layer_width=4, num_layers=5)
    x = torch.randn(6, 10)
    x[2, 7] = float("nan")
    with spinal_ops.use_backend("cpu"):
        y = m(x)
    assert torch.isnan(y[2]).all()
    assert not torch.isnan(y[[0, 1, 3, 4, 5]]).any()


def test_many_rows_match_reference():
    m = SpinalLinear(12, 4, layer_width=5, num_layers=3, dtype=torch.float64)
    x = torch.randn(70_000, 12, dtype=torch.float64)
    with spinal_ops.use_backend("cpu"):
        got = m(x)
    with spinal_ops.use_backend("reference"):
        ref = m(x)
    assert_close(got, ref, what="cpu 70,000 rows")


@pytest.mark.parametrize("case", [
    Case(64, 13, 3, 4, 4, split_mode="alternate"),  # column 12 read by no chunk
    Case(64, 16, 3, 4, 5, split_mode="alternate", tie=(0, 1, 2, 1, 2), activation="gelu"),  # c = 5: column 15, tied
    Case(64, 13, 3, 5, 4),  # cyclic, c = 4: the last chunk wraps onto the first's columns (written, then added)
    Case(6, 13, 3, 4, 4, split_mode="alternate"),  # one tile: dx zero-filled first
    Case(300, 1024, 8, 4, 8),  # each column read once, dx of 2.4 MB: written with streaming stores
    Case(300, 1024, 8, 4, 7),  # the same, and the last chunk's columns read by no sub-layer
], ids=["gap", "gaps-tied", "wrap-overlap", "one-tile", "streamed", "streamed-gap"])
def test_dx_first_writes_and_unread_columns(case):
    """With several row tiles (B = 64: four of 16 rows) the backward writes the first product into each column of dx
    and adds the others', with no zero fill first (and where each column is read once and dx is larger than 1 MB,
    with streaming stores): dx against the reference, and the columns no chunk reads exactly zero, after the
    allocator has held NaN in blocks of dx's size."""
    check_against_reference("cpu", case, torch.float64)
    x, params = make_inputs(case, torch.float64)
    with spinal_ops.use_backend("cpu"):
        out = spinal_ops.spinal_linear(x, **params, **functional_kwargs(case))
    poison = [torch.full_like(x, math.nan) for _ in range(8)]
    del poison
    (dx,) = torch.autograd.grad(out.sum(), [x])
    unread = unread_columns(case)
    assert not dx.isnan().any()
    assert not unread or torch.equal(dx[:, unread], torch.zeros_like(dx[:, unread]))


@pytest.mark.parametrize("shape", [(0, 10), (2, 0, 10), (3, 4, 10)], ids=["empty", "empty-3d", "3d"])
def test_leading_dims_like_linear(shape):
    m = SpinalLinear(10, 3, layer_width=4, dtype=torch.float64)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    with spinal_ops.use_backend("cpu"):
        y = m(x)
    assert y.shape == (*shape[:-1], 3)
    with spinal_ops.use_backend("reference"):
        ref = m(x)
    assert_close(y, ref, what=f"cpu leading dims {shape}")
    y.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_runs_on_the_cpu_kernels(dtype):
    """The automatic choice runs bfloat16 / float16 modules on the cpu kernels: output and gradients in the
    input's dtype, against the reference under the tolerance rule."""
    torch.manual_seed(0)
    m = SpinalLinear(10, 3, layer_width=4, dtype=dtype)
    x = torch.randn(5, 10, dtype=dtype, requires_grad=True)
    assert spinal_ops.backends.select_backend(x.device, x.dtype) == "cpu"
    y = m(x)
    assert y.dtype == dtype
    cot = torch.randn(y.shape, dtype=torch.float64).to(dtype)
    got = torch.autograd.grad(y, [x, *m.parameters()], cot)
    m64 = copy.deepcopy(m).double()
    x64 = x.detach().double().requires_grad_()
    with spinal_ops.use_backend("reference"):
        y_hi, y_same = m64(x64), m(x)
    hi = torch.autograd.grad(y_hi, [x64, *m64.parameters()], cot.double())
    same = torch.autograd.grad(y_same, [x, *m.parameters()], cot)
    assert_close(y, y_hi, y_same, what=f"cpu (automatic choice) {dtype} output")
    names = ["x", *(n for n, _ in m.named_parameters())]
    for name, g, e, e_same in zip(names, got, hi, same, strict=True):
        assert g.dtype == dtype, f"cpu (automatic choice) {dtype} d{name} has dtype {g.dtype}"
        assert_close(g, e, e_same, what=f"cpu (automatic choice) {dtype} d{name}")


# Reduced-precision cases for the bitwise check below: the dot kernel on weights as stored (B < 16), a wrapping
# chunk, short k on a W^T packed (widened) from them (w < 64, B >= 2), one row (axpy_row), partial vectors, tied
# slots, hidden mode, and act' from the recomputed Z (leaky_relu, negative slope), and transposed tiles (short
# products, B >= 256: the weights widened for them). No product goes to the BLAS (use_blas: >= 16 rows and >= 32
# columns on both sides), which only the float32 kernels may call, on any instruction set: fewer than 16 rows, or
# (the last case) chunk, width and outputs under 32.
REDUCED_CASES = [
    Case(1, 300, 2, 70, 3),
    Case(5, 37, 3, 21, 4, activation="leaky_relu", negative_slope=-0.2),
    Case(15, 203, 2, 40, 6, out=10, tie=(0, 1, 2, 3, 2, 3)),
    Case(3, 130, 2, 33, 3, head=False, split_mode="alternate"),
    Case(300, 61, 2, 17, 4, activation="tanh"),
]


def bf16_pairs() -> bool:
    """Whether the cpu kernels run bfloat16 input products on AVX512_BF16 pairs here (kernels::pair_gemm)."""
    return torch.ops.spinal_ops._cpu_isa() == "avx512_bf16"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", REDUCED_CASES, ids=[c.id for c in REDUCED_CASES])
def test_reduced_precision_is_the_float32_kernels_rounded_once(case, dtype):
    """bfloat16 / float16 on the cpu backend: float32 arithmetic on the values as given, one rounding on exit. The
    weights are read as stored and widened in the kernels' registers (kernels::load_wide): H, y and every gradient
    equal the float32 kernels run on the widened tensors, rounded, bit for bit. (With AVX512_BF16 the bfloat16
    input products sum in pairs instead: test_bfloat16_pairs; the subprocess of
    test_kernels_of_each_instruction_set_match_reference checks this one capped to avx512.)"""
    if dtype == torch.bfloat16 and bf16_pairs():
        pytest.skip("bfloat16 input products on AVX512_BF16 pairs")
    assert_rounded_once(case, dtype)


def assert_rounded_once(case, dtype):
    x, params = make_inputs(case, dtype, seed=4)
    starts, slots = case.layer_args()
    weights = [params[k] for k in ("weight_x", "weight_h", "bias", "head_weight", "head_bias")]
    wide = [None if t is None else t.detach().float() for t in weights]
    args = (starts, slots, case.activation, case.negative_slope)
    h, y = torch.ops.spinal_ops.spinal_forward(x.detach(), *[None if t is None else t.detach() for t in weights],
                                               *args)
    h32, y32 = torch.ops.spinal_ops.spinal_forward(x.detach().float(), *wide, *args)
    assert torch.equal(h, h32.to(dtype)) and torch.equal(y, y32.to(dtype))
    g = torch.Generator().manual_seed(5)
    gy = torch.randn(y.shape, generator=g).to(dtype) if case.head else None
    gh = torch.randn(h.shape, generator=g).to(dtype)
    # act' from Z (leaky_relu, negative slope): the backward recomputes the float32 H; else it reads H as given
    h_in = h32 if case.negative_slope < 0 else h.float()
    mask = [True] * 4 + [case.head] * 2
    got = torch.ops.spinal_ops._spinal_backward(gy, gh, x.detach(), h, *[None if t is None else t.detach()
                                                                         for t in weights[:4]], *args, mask)
    want = torch.ops.spinal_ops._spinal_backward(None if gy is None else gy.float(), gh.float(), x.detach().float(),
                                                 h_in, *wide[:4], *args, mask)
    names = ("x", "weight_x", "weight_h", "bias", "head_weight", "head_bias")
    for name, a, b in zip(names, got, want, strict=True):
        assert a.dtype == dtype and torch.equal(a, b.to(dtype)), f"{case.id} {dtype}: grad of {name}"


# bfloat16 cases for the pairs, where the CPU has AVX512_BF16. On Wx and Wh packed in pairs (pack_weights: a short
# chunk or width, or >= 64 outputs and >= 256 rows): an odd chunk (the last pair's second term), wrapping chunks
# (gathered), partial vectors of outputs, rows not a multiple of the 6-row tile, act' from the recomputed Z (the
# recurrence then in float32), tied slots, one 256-row tile whose sub-layers split into column blocks (w = 200). On Wx
# and Wh as stored (the dot form): one row, wrapping chunks of odd length (the products before and after the wrap), a
# chunk of more than 512 terms (two blocks of k).
PAIR_CASES = [
    Case(7, 26, 2, 21, 1, head=False),
    Case(259, 301, 3, 70, 4, activation="leaky_relu", negative_slope=-0.2),
    Case(300, 65, 2, 96, 6, out=5, tie=(0, 1, 2, 3, 2, 3)),
    Case(256, 1000, 2, 200, 3),
    Case(1, 300, 2, 70, 3),
    Case(9, 301, 3, 70, 4, activation="leaky_relu", negative_slope=-0.2),
    Case(5, 1300, 2, 37, 2, head=False),
]


def assert_same_on_1_and_2_threads(case, dtype):
    """The output and every gradient of ``case`` on the cpu backend, bitwise equal on 1 and 2 threads."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = run_case("cpu", case, dtype, seed=3)
        torch.set_num_threads(1)
        one = run_case("cpu", case, dtype, seed=3)
    finally:
        torch.set_num_threads(threads)
    for name, t in two.items():
        assert (t is None and one[name] is None) or torch.equal(t, one[name]), f"{case.id}: {name} 1 vs 2 threads"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("shape", [(4, 300, 1000), (3, 5, 7), (2, 0, 4), (6, 3, 1), (3, 9, 300)], ids=str)
@pytest.mark.parametrize("columns", [False, True], ids=["rows", "columns"])
def test_scale_rows_backward(shape, dtype, columns, threads):
    """_scale_rows_backward_inplace (the backward of a batch norm folded into the weights): grad scaled in place into
    the weights' gradient, bit for bit grad * scale[..., None] (columns: scale[..., None, :]), and the scale's
    gradient, the rows' (columns') dot products, within the tolerance rule; both bitwise the same on 1 and 2 threads
    (rows, and blocks of columns, are independent jobs; (3, 9, 300) has blocks of columns and a partial last one)."""
    require_backend("cpu")
    torch.manual_seed(0)
    dim = -2 if columns else -1
    scale_shape = shape[:-2] + shape[-1:] if columns else shape[:-1]
    grad, weight, scale = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype), \
        torch.randn(scale_shape, dtype=dtype)
    results = {}
    for n in (2, 1):
        threads(n)
        g = grad.clone()
        results[n] = (torch.ops.spinal_ops._scale_rows_backward_inplace(g, weight, scale, True, columns), g)
    grad_scale, scaled = results[2]
    assert torch.equal(scaled, grad * scale.unsqueeze(dim)), f"{shape}: grad not scaled in place bit for bit"
    expected = (grad.double() * weight.double()).sum(dim)
    assert_close(grad_scale, expected, (grad * weight).sum(dim), what=f"{shape} {dtype} grad_scale")
    assert torch.equal(results[1][0], grad_scale) and torch.equal(results[1][1], scaled), f"{shape}: 1 vs 2 threads"
    g = grad.clone()
    empty = torch.ops.spinal_ops._scale_rows_backward_inplace(g, weight, scale, False, columns)
    assert empty.numel() == 0 and torch.equal(g, scaled), f"{shape}: without the scale's gradient"


def test_scale_rows_backward_refuses_bad_arguments():
    require_backend("cpu")
    op = torch.ops.spinal_ops._scale_rows_backward_inplace
    w, s = torch.randn(2, 3, 4), torch.randn(2, 3)
    with pytest.raises(RuntimeError, match=r"grad of weight's shape.*got grad \[2, 3, 5\]"):
        op(torch.randn(2, 3, 5), w, s, True)
    with pytest.raises(RuntimeError, match=r"scale of weight's shape without its last dimension.*scale \[2, 4\]"):
        op(torch.randn(2, 3, 4), w, torch.randn(2, 4), True)
    with pytest.raises(RuntimeError, match="float32 or float64 tensors of one dtype, got grad Double"):
        op(torch.randn(2, 3, 4, dtype=torch.float64), w, s, True)
    with pytest.raises(RuntimeError, match="must be contiguous"):
        op(torch.randn(2, 4, 3).transpose(1, 2), w, s, True)
    with pytest.raises(RuntimeError, match=r"scale of weight's shape without its second-to-last dimension, \[2, 4\], "
                                           r"got scale \[2, 3\]"):
        op(torch.randn(2, 3, 4), w, s, True, True)
    with pytest.raises(RuntimeError, match=r"weight of at least 2 dimensions.*weight \[4\]"):
        op(torch.randn(4), torch.randn(4), torch.randn(4), True, True)


# --- _dropout_noise_: F.dropout's noise, drawn as ATen's serial bernoulli_ draws it ---------------------------------


def _mt_state(gen: torch.Generator) -> tuple[np.ndarray, int, int]:
    """``(words, left, next)`` of a CPU generator's mt19937: the leading fields of the state ``get_state`` returns
    (``uint64 seed; int left; int seeded; uint64 next; uint64 state[624]``). ``left - 1`` words are ready from
    ``next``."""
    raw = bytes(gen.get_state().numpy())
    left, = struct.unpack_from("<i", raw, 8)
    nxt, = struct.unpack_from("<Q", raw, 16)
    return np.frombuffer(raw, "<u8", 624, 24).astype(np.uint32), left, nxt


def _model_noise(gen: torch.Generator, shape, p: float, dtype) -> tuple[torch.Tensor, np.ndarray, int]:
    """The noise ``F.dropout`` draws for ``shape`` from ``gen``'s state, computed with numpy's MT19937 (the same engine,
    another implementation): two words (hi, lo) an element in memory order, kept when the 53 low bits of
    ``hi << 32 | lo`` times 2^-53 are below ``1 - p``, kept elements ``1 / (1 - p)`` in ``dtype``. Returns it
    (contiguous) with the state's words and position after."""
    words, left, _ = _mt_state(gen)
    rs = np.random.RandomState()
    rs.set_state(("MT19937", words, 625 - left))  # numpy: the words from pos on are ready
    n = math.prod(shape)
    draws = rs.randint(0, 2**32, size=2 * n, dtype=np.uint64)  # one word each (a full 32-bit range)
    u = ((draws[0::2] << np.uint64(32)) | draws[1::2]) & np.uint64(2**53 - 1)
    keep = 1 - p
    kept = torch.from_numpy(u.astype(np.float64) * 2.0**-53 < keep).reshape(shape)
    one = torch.ones((), dtype=dtype)
    noise = torch.where(kept, one / torch.tensor(keep, dtype=dtype), torch.zeros((), dtype=dtype))
    _, key, pos = rs.get_state()[:3]
    return noise, key, pos


def _follows_model(gen_after: torch.Generator, key: np.ndarray, pos: int) -> bool:
    words, left, nxt = _mt_state(gen_after)
    return np.array_equal(words, key) and nxt == pos and left == 625 - pos


@pytest.mark.parametrize("p", [0.5, 0.1, 0.75])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_dropout_noise_draws_the_bernoulli_stream(dtype, p):
    """_dropout_noise_ against the model of bernoulli_(1 - p).div_(1 - p): the same values (in memory order, for a
    transposed tensor too) and the generator's state after, from the seeded state and from positions within the
    state, even and odd (three single-word draws before: an element's two words then straddle a regeneration), across
    its regenerations (every 312 elements)."""
    op = torch.ops.spinal_ops._dropout_noise_
    for before, single_words in [(0, 0), (1, 0), (311, 0), (2000, 0), (0, 3), (311, 3)]:
        for shape, transposed in [((1,), False), ((311,), False), ((313,), False), ((1000,), False),
                                  ((2500,), False), ((7, 300), True)]:
            gen = torch.Generator().manual_seed(11)
            op(torch.empty(before, dtype=dtype), p, gen) if before else None
            torch.rand(single_words, generator=gen)  # float32 uniform: one 32-bit word an element
            expected, key, pos = _model_noise(gen, shape, p, dtype)  # in memory order
            memory = torch.empty(shape, dtype=dtype)
            op(memory.t() if transposed else memory, p, gen)  # a transposed view is filled in memory order too
            what = (f"{dtype} p={p} after {before} elements and {single_words} words, shape {shape}"
                    f"{' transposed' if transposed else ''}")
            assert torch.equal(memory, expected), what
            assert _follows_model(gen, key, pos), f"{what}: generator state after"


def _temper(y: int) -> int:
    y ^= y >> 11
    y ^= (y << 7) & 0x9D2C5680
    y ^= (y << 15) & 0xEFC60000
    return (y ^ (y >> 18)) & 0xFFFFFFFF


def _untemper(y: int) -> int:
    """The state word that mt19937's tempering turns into ``y``."""
    y ^= y >> 18
    y ^= (y << 15) & 0xEFC60000
    x = y
    for _ in range(5):  # y ^= (y << 7) & 0x9D2C5680, inverted 7 bits at a time
        x = y ^ ((x << 7) & 0x9D2C5680)
    x &= 0xFFFFFFFF
    z = x
    for _ in range(3):  # y ^= y >> 11
        z = x ^ (z >> 11)
    return z


@pytest.mark.parametrize("keep", [0.5, 0.3])
def test_dropout_noise_keeps_exactly_below_the_threshold(keep):
    """At the edge: an element is kept when u * 2^-53 < 1 - p, u the 53 low bits of its two words. A state crafted so
    that the next element's u is ceil((1 - p) * 2^53) - 1 (kept) or ceil((1 - p) * 2^53) (dropped), for 1 - p whose
    threshold is an integer (0.5) and one where it is not (0.3); torch's bernoulli_ draws the same."""
    below = math.ceil(keep * 2**53)
    for u, kept in ((below - 1, True), (below, False)):
        gen = torch.Generator().manual_seed(5)
        raw = bytearray(gen.get_state().numpy().tobytes())
        struct.pack_into("<i", raw, 8, 625 - 10)  # 614 words ready from word 10
        struct.pack_into("<Q", raw, 16, 10)
        tempered = ((u >> 32) | (0x7FF << 21), u & 0xFFFFFFFF)  # bits above the 53 low ones set: they must not count
        for i, word in enumerate(tempered):
            assert _temper(_untemper(word)) == word
            struct.pack_into("<Q", raw, 24 + 8 * (10 + i), _untemper(word))
        state = torch.frombuffer(raw, dtype=torch.uint8).clone()
        gen.set_state(state)
        got = torch.empty(1, dtype=torch.float64)
        torch.ops.spinal_ops._dropout_noise_(got, 1 - keep, gen)
        assert bool(got[0] != 0) is kept, f"keep {keep}: u = {u} ({'below' if kept else 'at'} the threshold)"
        if ops._noise_matches(torch.float64, 1 - keep):
            gen.set_state(state)
            theirs = torch.empty(1, dtype=torch.float64).bernoulli_(keep, generator=gen)
            assert bool(theirs[0] != 0) is kept, f"keep {keep}: torch's bernoulli_ at u = {u}"


@pytest.mark.parametrize("p", [0.5, 0.15, 0.9])  # 0.15: float(1 / 0.85) is not 1 / float(0.85)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_dropout_is_f_dropout(dtype, p):
    """spinal_ops.ops.dropout against F.dropout with the same seed: output, gradient and the default generator's state
    after, bit for bit. Its noise op runs exactly when this PyTorch's bernoulli_ follows the model (the probe
    _noise_matches says so), else F.dropout runs."""
    x = torch.randn(37, 53, dtype=dtype).requires_grad_()
    grad = torch.randn(37, 53, dtype=dtype)
    results = []
    for fn in (lambda t: F.dropout(t, p, training=True), lambda t: ops.dropout(t, p)):
        torch.manual_seed(3)
        with _RecordOps() as record:
            out = fn(x)
        state = torch.get_rng_state()
        results.append((out, torch.autograd.grad(out, x, grad)[0], state, record.names))
    (out, dx, state, _), (got, got_dx, got_state, names) = results
    assert torch.equal(got, out) and torch.equal(got_dx, dx), f"{dtype} p={p}: output or gradient"
    assert torch.equal(got_state, state), f"{dtype} p={p}: default generator's state after"
    gen = torch.Generator().manual_seed(3)
    expected, _, _ = _model_noise(gen, (64,), p, dtype)
    follows = torch.equal(torch.empty(64, dtype=dtype).bernoulli_(1 - p, generator=gen).div_(1 - p), expected)
    assert ops._noise_matches(dtype, p) is follows, f"{dtype} p={p}: the probe disagrees with the model"
    assert ("spinal_ops._dropout_noise_.default" in names) is follows, f"{dtype} p={p}: ran {names}"


class _RecordOps(TorchDispatchMode):
    """The names of the ops dispatched inside it."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def test_dropout_noise_refuses_bad_arguments():
    op = torch.ops.spinal_ops._dropout_noise_
    with pytest.raises(RuntimeError, match="float32 or float64 CPU tensor, got BFloat16"):
        op(torch.empty(4, dtype=torch.bfloat16), 0.5)
    with pytest.raises(RuntimeError, match=r"non-overlapping and dense.*strides \[2\]"):
        op(torch.empty(8)[::2], 0.5)
    for p in (0.0, 1.0, -0.5):
        with pytest.raises(RuntimeError, match=f"0 < p < 1.*got p = {p:g}"):
            op(torch.empty(4), p)


def check_pairs(case):
    """The pair products against the reference (tolerance rule), and bitwise equal on 1 and 2 threads. (Their order
    of summation: the two tests below, with sums that show it.)"""
    check_against_reference("cpu", case, inputs=make_inputs(case, torch.bfloat16, seed=6))
    assert_same_on_1_and_2_threads(case, torch.bfloat16)


@pytest.mark.parametrize("case", PAIR_CASES, ids=[c.id for c in PAIR_CASES])
def test_bfloat16_pairs(case):
    if not bf16_pairs():
        pytest.skip("this CPU has no AVX512_BF16")
    check_pairs(case)


@pytest.mark.parametrize("in_features", [4, 16384], ids=["two-tiles", "one-tile"])
def test_bfloat16_backward_products_on_pairs_take_dz_rounded(in_features):
    """With AVX512_BF16 and 16 rows or more, the backward of a bfloat16 call runs dWx_i = dZ_i^T x_chunk and dWh_i =
    dZ_i^T H_{i-1} on pairs of rows (pair_tn_product) and dx += dZ_i Wx_i on pairs of dZ's columns (pair_product), dZ
    rounded to bfloat16 first (as the reference in bfloat16 rounds it; the chain keeps it in float32): in two row tiles
    (D = 4: dZ of every sub-layer packed after the chain) and in one (D = 16384: weights over 1 MB, the batch is one
    tile, dZ_i packed in its sub-layer's round). Values where that rounding shows: identity activation, two sub-layers
    of 16, 32 rows, x all ones, one output whose weights alternate a = 1 + 2^-7 and b = 1 + 2^-6 along the columns,
    grad_y alternating a and -b along the rows. dZ is then a^2 = 1 + 2^-6 + 2^-14, ab = 1 + 3 * 2^-7 + 2^-13, -ab,
    -b^2 = -(1 + 2^-5 + 2^-12), exact in float32, and in bfloat16 1 + 2^-6, 1 + 3 * 2^-7, -(1 + 3 * 2^-7),
    -(1 + 2^-5). Every sum below takes 8 or 16 pairs of terms whose float32 sum differs from the rounded one by a
    bfloat16 ulp or more: dWx (against x = 1) is -2^-3 exactly with dZ rounded (-(2^-3 + 2^-10) or -(2^-3 + 2^-9) in
    float32); dWh is that times H_0 = +-D/4 (Wx_0 = +-1/4 alternating along its rows); dx is -2^-6 on the even rows
    and 2^-6 on the odd ones (-(2^-6 + 2^-13) and 2^-6 + 2^-12 in float32)."""
    if not bf16_pairs():
        pytest.skip("this CPU has no AVX512_BF16")
    case = Case(32, in_features, 1, 16, 2, out=1, activation="identity", bias=False)
    starts, slots = case.layer_args()
    bf = torch.bfloat16
    a, b = 1 + 2.0**-7, 1 + 2.0**-6
    sign = torch.tensor([1.0 if j % 2 == 0 else -1.0 for j in range(16)])
    x = torch.ones(32, in_features, dtype=bf)
    weight_x = torch.zeros(2, 16, in_features, dtype=bf)
    weight_x[0] = (sign / 4).unsqueeze(1).to(bf)
    weight_h = torch.zeros(1, 16, 16, dtype=bf)
    head_weight = torch.tensor([[a if j % 2 == 0 else b for j in range(32)]], dtype=bf)
    grad_y = torch.tensor([[a if r % 2 == 0 else -b] for r in range(32)], dtype=bf)
    h, _ = torch.ops.spinal_ops.spinal_forward(x, weight_x, weight_h, None, head_weight, None, starts, slots,
                                               "identity", 0.0)
    assert torch.equal(h[:, :16], (in_features / 4 * sign).expand(32, 16).to(bf))
    dx, dwx, dwh, _, _, _ = torch.ops.spinal_ops._spinal_backward(grad_y, None, x, h, weight_x, weight_h, None,
                                                                  head_weight, starts, slots, "identity", 0.0,
                                                                  [True, True, True, False, False, False])
    assert torch.equal(dwx, torch.full_like(dwx, -(2.0**-3))), dwx.unique()
    assert torch.equal(dwh[0], (-(2.0**-3) * in_features / 4 * sign).expand(16, 16).to(bf)), dwh.unique()
    rows = torch.tensor([-(2.0**-6) if r % 2 == 0 else 2.0**-6 for r in range(32)])
    assert torch.equal(dx, rows.unsqueeze(1).expand(32, in_features).to(bf)), dx.unique()


# Sums whose rounding shows the order of summation (x row, Wx row, rows, H on the pairs, H summed in order: the
# float32 kernels). Products 2^24, 0, -2^24, 1 on three rows, Wx packed in pairs: pair by pair, the odd term first,
# each addition rounded, 2^24 + 1 rounds to 2^24 before -2^24 is added: 0; in order 1. Products 2^24, 1, 1, -2^24 on
# one row, Wx as stored (the dot form): lane 0 sums the pair (2^24, 1) to 2^24, lane 1 the pair (1, -2^24) to
# 1 - 2^24, the lanes sum to 1; in order 2^24 + 1 rounds to 2^24: 0. (The bfloat16 rounding of H keeps these
# differences; the random cases of test_bfloat16_pairs mostly round them away.)
ORDER_CASES = [
    ((2.0**12, 0, -(2.0**12), 1), (2.0**12, 0, 2.0**12, 1), 3, 0, 1),
    ((2.0**12, 1, 1, -(2.0**12)), (2.0**12, 1, 1, 2.0**12), 1, 1, 0),
]


@pytest.mark.parametrize(("x_row", "w_row", "rows", "paired", "ordered"), ORDER_CASES, ids=["packed", "as-stored"])
def test_bfloat16_pairs_sum_in_the_order_of_the_instruction(x_row, w_row, rows, paired, ordered):
    ordered = torch.full((rows, 17), float(ordered))
    if rows == 1 and torch.ops.spinal_ops._cpu_isa() == "baseline":
        # The float32 dot form with 16-byte vectors: the four products fill one vector. The blocks of four outputs
        # (the first 16) fold its halves before its lanes: (2^24 + 1) + (1 - 2^24) = 1; the 17th output sums its
        # lanes in order (csrc/cpu/spinal_gemm.h, the dot kernel's lane sums). Wider vectors take four terms as the
        # tail of the row, summed in order.
        ordered[:, :16] = 1
    x = torch.tensor([x_row] * rows, dtype=torch.bfloat16)
    wx = torch.tensor([w_row] * 17, dtype=torch.bfloat16)[None]
    args = (torch.zeros(0, 17, 17, dtype=torch.bfloat16), torch.zeros(1, 17, dtype=torch.bfloat16), None, None, [0],
            [0], "relu", 0.01)
    h, _ = torch.ops.spinal_ops.spinal_forward(x, wx, *args)
    h32, _ = torch.ops.spinal_ops.spinal_forward(x.float(), wx.float(), *[t.float() if isinstance(t, torch.Tensor)
                                                                         else t for t in args])
    assert h32.eq(ordered).all()
    assert h.eq(paired if bf16_pairs() else ordered).all(), torch.ops.spinal_ops._cpu_isa()


# Forwards of short products (chunk and width under 64 terms) in tiles of 32 rows or more with AVX-512, 16 otherwise,
# run transposed (forward_tile_transposed in csrc/cpu/spinal_cpu.cpp): B >= 256 with these small weights gives 32-row
# tiles or more; B = 64 gives four tiles of 16 rows (transposed without AVX-512). Wrapping chunks, a width of one
# vector and a lane, hidden mode, tied slots; leaky_relu with a negative slope (act' from Z) stays on the usual tiles.
TRANSPOSED_CASES = [
    Case(256, 8, 2, 50, 6, out=1, activation="leaky_relu", negative_slope=0.01),
    Case(64, 8, 2, 50, 6, out=1, activation="leaky_relu", negative_slope=0.01),
    Case(300, 61, 2, 17, 4, activation="tanh"),
    Case(257, 9, 2, 63, 3, activation="sigmoid", head=False),
    Case(512, 40, 3, 33, 5, tie=(0, 1, 2, 1, 2)),
    Case(300, 61, 2, 17, 4, activation="leaky_relu", negative_slope=-0.2),
]


@pytest.mark.parametrize("case", TRANSPOSED_CASES, ids=[c.id for c in TRANSPOSED_CASES])
def test_transposed_tiles(case):
    """Against the reference (tolerance rule) in float32 and float64, and bitwise equal on 1 and 2 threads. (Reduced
    precision on these tiles: the last of REDUCED_CASES.)"""
    for dtype in (torch.float32, torch.float64):
        check_against_reference("cpu", case, dtype)
    assert_same_on_1_and_2_threads(case, torch.float32)


def test_reduced_precision_backward_takes_z_from_the_float32_chain():
    """leaky_relu with a negative slope takes act' from Z, recomputed in the backward. From the bfloat16 H the forward
    returned, its rounding moved Z across the kink in this example (found by test_fuzz: dx error 0.22, tolerance
    0.16); the backward recomputes the float32 H the forward kernel computed."""
    case = Case(255, 1, 1, 11, 2, out=1, activation="leaky_relu", negative_slope=-0.3)
    check_against_reference("cpu", case, inputs=make_inputs(case, torch.bfloat16, seed=2))


@pytest.mark.parametrize("rows", [1, 3])
def test_weight_gradients_larger_than_the_l2_cache(rows):
    """weight_x slots of 512 x 600 float32 (1.2 MB) are written with streaming stores (csrc/cpu/spinal_cpu.cpp,
    kStreamBytes), whose rows of 2400 bytes alternate between 64-byte aligned and not; B = 1 is one tile (the
    gradients in the rounds of the chain), B = 3 too, with products of three rows."""
    case = Case(rows, 1201, 2, 512, 2, out=4)
    check_against_reference("cpu", case, torch.float32)


def test_dtypes_without_a_cpu_kernel_raise_when_forced():
    x = torch.randn(2, 10).to(torch.float8_e4m3fn)
    m = SpinalLinear(10, 3, layer_width=4)
    params = [p.detach().to(torch.float8_e4m3fn) for p in (m.weight_x, m.weight_h, m.bias, m.head_weight, m.head_bias)]
    with pytest.raises(RuntimeError, match="'cpu' cannot run cpu tensors of dtype torch.float8_e4m3fn.*float16\\)"):
        with spinal_ops.use_backend("cpu"):
            spinal_ops.spinal_linear(x, *params, num_splits=2)
    with pytest.raises(RuntimeError, match="x must be float32, float64, bfloat16 or float16, got Float8_e4m3fn"):
        torch.ops.spinal_ops.spinal_forward(x, *params, [0, 5, 0, 5], [0, 1, 2, 3], "relu", 0.01)


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda a: a.__setitem__(2, a[2][:, :-1].contiguous()),
         r"weight_h must have shape \[3, 5, 5\], got \[3, 4, 5\]"),
        (lambda a: a.__setitem__(1, a[1].float()), "weight_x must have the dtype of x \\(Double\\), got Float"),
        (lambda a: a.__setitem__(6, [0, 4, 99, 0, 0]), r"starts\[2\] must be in \[0, 13\), got 99"),
        (lambda a: a.__setitem__(8, "swish"), "activation must be one of .*got 'swish'"),
        (lambda a: a.__setitem__(0, a[0].t()), "x must be 2-D|x must be contiguous"),
    ],
    ids=["weight_h-shape", "weight_x-dtype", "start-range", "activation", "x-layout"],
)
def test_op_argument_errors(mutate, match):
    args = [a.detach() if isinstance(a, torch.Tensor) else a for a in _op_args(CASES["wrap"])]
    mutate(args)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.spinal_ops.spinal_forward(*args)


# --- the products (csrc/cpu/spinal_gemm.h) and the kernels of each instruction set -------------------------------

# (m, n, k): one row, a few rows (every row tail of the 6- and 4-row blocks), column tails (n % 16, n % 8), short k
# (outer products, the packed and the dot routes' boundary at 64), k over the dot route's 256-term blocks, widths
# over its 64-output blocks; TN products narrower than a vector (run transposed: 37 x 1, 17 x 3, 50 x 4 in float32),
# and one the BLAS would take but for its k under kBlasMinTnRows (40 x 64 x 100); with AVX2 or the baseline the
# smallest product every form sends to the BLAS (16 x 32 x 512: kBlasMinNnTerms), the NN products below it on the
# kernels (23 x 70 x 300, 64 x 129 x 257)
GEMM_SHAPES = [(1, 1, 1), (1, 20, 256), (1, 37, 5), (1, 513, 130), (2, 3, 4), (5, 17, 63), (7, 16, 64),
               (13, 50, 50), (6, 128, 1), (23, 70, 300), (64, 129, 257), (300, 20, 1024), (257, 512, 1),
               (37, 1, 5), (17, 3, 300), (50, 4, 1024), (40, 64, 100), (16, 32, 512)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (True, False), (False, True)], ids=["nn", "tn", "nt"])
@pytest.mark.parametrize("shape", GEMM_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_products_match_matmul(shape, trans_a, trans_b, dtype):
    """Every route of the cpu kernels' products against torch.matmul in float64, under the tolerance rule."""
    m, n, k = shape
    g = torch.Generator().manual_seed(m * 1000 + n * 10 + k)
    a = torch.randn(k, m, generator=g, dtype=torch.float64) if trans_a else torch.randn(m, k, generator=g,
                                                                                     dtype=torch.float64)
    b = torch.randn(n, k, generator=g, dtype=torch.float64) if trans_b else torch.randn(k, n, generator=g,
                                                                                     dtype=torch.float64)
    expected = (a.t() if trans_a else a) @ (b.t() if trans_b else b)
    same = (a.to(dtype).t() if trans_a else a.to(dtype)) @ (b.to(dtype).t() if trans_b else b.to(dtype))
    got = torch.ops.spinal_ops._cpu_gemm(a.to(dtype), b.to(dtype), trans_a, trans_b)
    assert_close(got, expected, same, what=f"_cpu_gemm {m}x{n}x{k} trans_a={trans_a} trans_b={trans_b} {dtype}")


def test_product_argument_errors():
    with pytest.raises(RuntimeError, match=r"op\(a\) is 3 x 4 but op\(b\) is 5 x 2"):
        torch.ops.spinal_ops._cpu_gemm(torch.randn(3, 4), torch.randn(5, 2), False, False)
    with pytest.raises(RuntimeError, match="float32 or float64 CPU tensors of one dtype"):
        torch.ops.spinal_ops._cpu_gemm(torch.randn(3, 4), torch.randn(4, 2, dtype=torch.float64), False, False)


ISAS = ("baseline", "avx2", "avx512", "avx512_bf16")

# Run in a subprocess with SPINAL_OPS_CPU_ISA capping the kernels: every case against the reference in float32 and
# float64 (the tolerance rule), and bitwise equal on 1 and 2 threads; bfloat16 / float16 weights widened in that
# set's registers (test_reduced_precision_is_the_float32_kernels_rounded_once), and with avx512_bf16 the pair
# products (test_bfloat16_pairs). Cases: awkward small shapes, one-tile batches
# split into column blocks, several row tiles; with avx2 / baseline the products of >= 16 rows and >= 32 columns
# run on the BLAS (use_blas), the others on that set's kernels.
_ISA_SCRIPT = r"""
import sys, torch
sys.path.insert(0, sys.argv[1])
from helpers import CASES, COLUMN_SPLIT_CASES, Case, assert_close, check_against_reference
print(torch.ops.spinal_ops._cpu_isa(), flush=True)
for m, n, k in [(1, 37, 5), (5, 17, 63), (23, 70, 300), (64, 129, 257), (257, 512, 1)]:
    for tb in (False, True):
        a, b = torch.randn(m, k, dtype=torch.float64), torch.randn(n, k) if tb else torch.randn(k, n)
        b = b.double()
        got = torch.ops.spinal_ops._cpu_gemm(a, b, False, tb)
        assert_close(got, a @ (b.t() if tb else b), what=f"_cpu_gemm {m}x{n}x{k} trans_b={tb} float64")
cases = [*CASES.values(), *COLUMN_SPLIT_CASES.values(), Case(257, 13, 2, 5, 4), Case(300, 200, 2, 64, 4, out=10),
         Case(70, 30, 3, 50, 6, activation="leaky_relu", negative_slope=-0.2, tie=(0, 1, 2, 3, 2, 3))]
from test_cpu import (REDUCED_CASES, PAIR_CASES, TRANSPOSED_CASES, assert_rounded_once,
                      assert_same_on_1_and_2_threads, bf16_pairs, check_pairs)
for case in cases:
    for dtype in (torch.float32, torch.float64):
        check_against_reference("cpu", case, dtype)
    assert_same_on_1_and_2_threads(case, torch.float32)
for case in TRANSPOSED_CASES:
    check_against_reference("cpu", case, torch.float32)
for case in REDUCED_CASES:
    for dtype in (torch.float16,) if bf16_pairs() else (torch.bfloat16, torch.float16):
        assert_rounded_once(case, dtype)
if bf16_pairs():
    for case in PAIR_CASES:
        check_pairs(case)
"""


@pytest.mark.parametrize("isa", ISAS)
def test_kernels_of_each_instruction_set_match_reference(isa):
    supported = torch.ops.spinal_ops._cpu_isa()  # this process: the widest the CPU supports (no cap set)
    if ISAS.index(isa) > ISAS.index(supported):
        pytest.skip(f"this CPU runs {supported} at most")
    env = {**os.environ, "SPINAL_OPS_CPU_ISA": isa}
    done = subprocess.run([sys.executable, "-c", _ISA_SCRIPT, str(pathlib.Path(__file__).parent)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"kernels capped to {isa}:\n{done.stdout}\n{done.stderr[-4000:]}"
    assert done.stdout.split()[0] == isa, f"SPINAL_OPS_CPU_ISA={isa} ran {done.stdout.split()[0]}"


def test_unknown_instruction_set_cap_is_ignored():
    """A process capped to an unknown set runs what an uncapped one runs (compared between two child processes: this
    one may itself run capped)."""
    code = "import torch, spinal_ops; print(torch.ops.spinal_ops._cpu_isa())"

    def child_isa(cap):
        env = {k: v for k, v in os.environ.items() if k != "SPINAL_OPS_CPU_ISA"}
        if cap is not None:
            env["SPINAL_OPS_CPU_ISA"] = cap
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout.strip()

    assert child_isa("sse9000") == child_isa(None)
