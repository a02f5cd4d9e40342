"""The digits demo: data, the two networks, a short training run per head, and the CLI."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("sklearn", reason="the demo needs scikit-learn (requirements.txt)")

from spinal_ops import SpinalLinear, demo  # noqa: E402
from spinal_ops.__main__ import main  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    """The demo's networks are tiny: one thread, as the demo itself uses, and restore torch's setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits():
    return demo.load_digits(seed=0)


def test_digits_split(digits):
    assert digits.train_x.shape == (1347, 1, 8, 8) and digits.test_x.shape == (450, 1, 8, 8)
    assert set(digits.test_y.tolist()) == set(range(10)), "the stratified test split misses a class"
    assert abs(digits.train_x.mean().item()) < 1e-4 and abs(digits.train_x.std().item() - 1) < 1e-3


def test_both_networks_differ_only_in_the_head():
    linear, spinal = demo.make_model("linear", seed=3), demo.make_model("spinal", seed=3)
    assert isinstance(spinal.fc, SpinalLinear) and isinstance(linear.fc, torch.nn.Linear)
    assert (spinal.fc.in_features, spinal.fc.out_features) == (512, 10)
    for (name, a), (_, b) in zip(linear.features.state_dict().items(), spinal.features.state_dict().items(),
                                         strict=True):
        assert torch.equal(a, b), f"feature weights {name} differ between the two networks"


@pytest.mark.parametrize("head", demo.HEADS)
def test_short_training_learns_the_digits(head, digits):
    history = demo.train(head, digits, epochs=4, seed=0)
    # Seed 0 reaches 97.3% (spinal) and 97.6% (linear) test accuracy after 4 epochs; 95% is the
    # acceptance bar of the full demo.
    assert history.test_accuracy[-1] >= 0.95, f"{head} head: test accuracy {history.test_accuracy} after 4 epochs"
    assert history.train_loss[-1] < history.train_loss[0] / 5, f"{head} head: train loss {history.train_loss}"
    assert len(history.epoch_seconds) == 4 and all(t > 0 for t in history.epoch_seconds)


def test_cli_demo_prints_both_heads_and_writes_the_plot(tmp_path, capsys):
    assert main(["demo", "--epochs", "1", "--out", str(tmp_path), "--no-progress"]) == 0
    text = capsys.readouterr().out
    for part in ("nn.Linear", "SpinalLinear", "test accuracy", "time / epoch", "demo.png"):
        assert part in text, f"{part!r} missing from the demo's output:\n{text}"
    png = (tmp_path / "demo.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000, f"demo.png is not a plot ({len(png)} bytes)"


def test_cli_demo_rejects_zero_epochs():
    with pytest.raises(SystemExit, match="--epochs must be >= 1, got 0"):
        main(["demo", "--epochs", "0"])
