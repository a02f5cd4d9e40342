"""The digits demo: data, the three networks (linear, dense two-layer, spinal heads) with their parameters and
FLOPs, a short training run per head, and the CLI."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

pytest.importorskip("sklearn", reason="the demo needs scikit-learn (requirements.txt)")

from spinal_ops import SpinalLinear, demo  # noqa: E402
from spinal_ops.__main__ import main  # noqa: E402
from spinal_ops.benchmark import EagerSpinal  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread(threads):
    """The demo's networks are tiny: one thread, as the demo itself uses, and restore torch's setting."""
    threads(1)


@pytest.fixture(scope="module")
def digits():
    return demo.load_digits(seed=0)


def test_digits_split(digits):
    assert digits.train_x.shape == (1347, 1, 8, 8) and digits.test_x.shape == (450, 1, 8, 8)
    assert set(digits.test_y.tolist()) == set(range(10)), "the stratified test split misses a class"
    assert abs(digits.train_x.mean().item()) < 1e-4 and abs(digits.train_x.std().item() - 1) < 1e-3


def test_the_networks_differ_only_in_the_head():
    models = {head: demo.make_model(head, seed=3) for head in demo.HEADS}
    assert isinstance(models["spinal"].fc, SpinalLinear) and isinstance(models["linear"].fc, torch.nn.Linear)
    assert (models["spinal"].fc.in_features, models["spinal"].fc.out_features) == (512, 10)
    for head, model in models.items():
        for (name, a), (_, b) in zip(models["linear"].features.state_dict().items(),
                                     model.features.state_dict().items(), strict=True):
            assert torch.equal(a, b), f"feature weights {name} differ between the linear and the {head} network"


def test_the_dense_head_has_the_spinal_heads_hidden_width():
    """Like with like: nn.Linear(512, L*w) -> ReLU -> nn.Linear(L*w, 10), L*w of the spinal head."""
    spinal = demo.make_model("spinal").fc
    dense = demo.make_model("dense").fc
    hidden = spinal.num_layers * spinal.layer_width
    assert [type(m) for m in dense] == [torch.nn.Linear, torch.nn.ReLU, torch.nn.Linear]
    assert (dense[0].in_features, dense[0].out_features, dense[2].in_features, dense[2].out_features) == \
        (512, hidden, hidden, 10)
    assert demo.make_model("dense")(torch.randn(3, 1, 8, 8)).shape == (3, 10)


def counted_flops(module, in_features=512) -> int:
    with FlopCounterMode(display=False) as counter:
        module(torch.randn(1, in_features))
    return counter.get_total_flops()


@pytest.mark.parametrize("head", demo.HEADS)
def test_head_flops_per_sample_match_torchs_flop_counter(head):
    fc = demo.make_model(head).fc
    # The spinal head's fused op is opaque to the counter: count its chain of nn.Linear (the same products).
    expected = counted_flops(EagerSpinal(fc) if head == "spinal" else fc)
    assert demo.head_flops(fc) == expected > 0


@pytest.mark.parametrize("head", demo.HEADS)
def test_short_training_learns_the_digits(head, digits):
    history = demo.train(head, digits, epochs=4, seed=0)
    # Seed 0 reaches 97.3% (spinal) and 97.6% (linear) test accuracy after 4 epochs; 95% is the
    # acceptance bar of the full demo.
    assert history.test_accuracy[-1] >= 0.95, f"{head} head: test accuracy {history.test_accuracy} after 4 epochs"
    assert history.train_loss[-1] < history.train_loss[0] / 5, f"{head} head: train loss {history.train_loss}"
    assert len(history.epoch_seconds) == 4 and all(t > 0 for t in history.epoch_seconds)


def test_cli_demo_prints_every_head_with_parameters_and_flops_and_writes_the_plot(tmp_path, capsys):
    torch.set_num_threads(2)  # the fixture restores torch's own setting afterwards
    assert main(["demo", "--epochs", "1", "--out", str(tmp_path), "--no-progress", "--threads", "1"]) == 0
    assert torch.get_num_threads() == 2, "the demo did not restore torch's thread count"
    text = capsys.readouterr().out
    for part in ("nn.Linear", "dense 2-layer", "SpinalLinear", "head params", "head FLOPs", "test accuracy",
                 "time / epoch", "Linear(512, 256) -> ReLU -> Linear(256, 10)", "demo.png"):
        assert part in text, f"{part!r} missing from the demo's output:\n{text}"
    for head in demo.HEADS:
        fc = demo.make_model(head).fc
        line = next(line for line in text.splitlines() if line.startswith(demo.HEAD_NAMES[head]))
        assert f"{sum(p.numel() for p in fc.parameters()):,}" in line and f"{demo.head_flops(fc):,}" in line, line
    png = (tmp_path / "demo.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000, f"demo.png is not a plot ({len(png)} bytes)"


def test_cli_demo_rejects_zero_epochs(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--epochs", "0"])
    assert exc.value.code == 2
    assert "argument --epochs: must be a positive integer, got 0" in capsys.readouterr().err
