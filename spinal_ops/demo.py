"""A small end-to-end demo: one CNN trained with three heads, an ``nn.Linear``, a dense two-layer head and a
``SpinalLinear``.

Data: scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes), which ship inside scikit-learn: no
download. The network is a two-convolution CNN whose 512 features feed the head, like the ResNet heads the
SpinalNet paper swaps. Heads:

- ``linear``: the single ``nn.Linear(512, 10)`` of the network as written;
- ``dense``: ``nn.Linear(512, L*w) -> ReLU -> nn.Linear(L*w, 10)``, the dense two-layer head of the spinal head's
  hidden width ``L*w`` (what the SpinalNet paper compares against): like with like;
- ``spinal``: the same network after ``spinal_ops.replace_linear(model, "fc")``.

All start from the same seed (identical convolution weights and batch order), so only the head differs; the
report gives each head's parameters and forward FLOPs per sample next to its accuracy.

Run it with ``python -m spinal_ops demo`` (options: ``--epochs``, ``--seed``, ``--out``, ``--threads``,
``--no-progress``).
"""

from __future__ import annotations

import dataclasses
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import reference
from .module import SpinalLinear
from .replace import replace_linear

HEADS = ("linear", "dense", "spinal")
HEAD_NAMES = {"linear": "nn.Linear", "dense": "dense 2-layer", "spinal": "SpinalLinear"}


@dataclasses.dataclass
class Digits:
    """Train/test split of the digits as tensors: images ``(N, 1, 8, 8)`` standardised, labels ``(N,)``."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


@dataclasses.dataclass
class History:
    """One training run: per-epoch train loss, test accuracy and wall time, and the parameter count."""

    head: str
    parameters: int  # whole network
    head_parameters: int = 0
    head_flops: int = 0  # forward FLOPs of the head per sample
    train_loss: list[float] = dataclasses.field(default_factory=list)
    test_accuracy: list[float] = dataclasses.field(default_factory=list)
    epoch_seconds: list[float] = dataclasses.field(default_factory=list)

    @property
    def seconds_per_epoch(self) -> float:
        return sum(self.epoch_seconds) / max(len(self.epoch_seconds), 1)


def load_digits(seed: int = 0, test_fraction: float = 0.25) -> Digits:
    """The digits, split stratified by class with ``seed``; standardised with the training set's statistics."""
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    data = sklearn_digits()
    x = data.images.astype(np.float32)  # (1797, 8, 8), values 0..16
    y = data.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=test_fraction, random_state=seed,
                                                        stratify=y)
    mean, std = x_train.mean(), x_train.std()

    def images(a):
        return torch.from_numpy((a - mean) / std).unsqueeze(1)

    return Digits(images(x_train), torch.from_numpy(y_train), images(x_test), torch.from_numpy(y_test))


class DigitsCNN(nn.Module):
    """``(N, 1, 8, 8) -> (N, 10)``: two 3x3 convolutions, a 2x2 max-pool, then ``fc`` on 512 features."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2), nn.Flatten(),  # 32 channels * 4 * 4 = 512 features
        )
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        return self.fc(self.features(x))


def spinal_hidden_width(in_features: int = 512) -> int:
    """``L*w`` of the spinal head ``replace_linear`` puts on ``in_features`` features (256 for 512)."""
    spinal = SpinalLinear(in_features, 10, device="meta")
    return spinal.num_layers * spinal.layer_width


def dense_head(in_features: int = 512, num_classes: int = 10) -> nn.Sequential:
    """The dense two-layer head of the spinal head's hidden width: ``Linear(D, L*w) -> ReLU -> Linear(L*w, out)``."""
    hidden = spinal_hidden_width(in_features)
    return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


def make_model(head: str, seed: int = 0) -> nn.Module:
    """The demo network with an ``nn.Linear`` head (``"linear"``), the dense two-layer head of the spinal head's
    hidden width (``"dense"``) or a ``SpinalLinear`` head (``"spinal"``)."""
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    torch.manual_seed(seed)
    model = DigitsCNN()
    torch.manual_seed(seed + 1)
    if head == "spinal":
        replace_linear(model, "fc")  # SpinalLinear(512, 10): 4 sub-layers of width 64 on chunks of 256
    elif head == "dense":
        model.fc = dense_head()  # Linear(512, 256) -> ReLU -> Linear(256, 10)
    return model


def head_flops(head: nn.Module) -> int:
    """Forward FLOPs per sample of a head: ``2 * in * out`` per ``nn.Linear``; a ``SpinalLinear``'s from
    ``reference.flops_per_row``. Activations are not counted."""
    if isinstance(head, SpinalLinear):
        out = head.out_features if head.head else 0
        return reference.flops_per_row(head.chunk, head.layer_width, head.num_layers, out)
    return sum(2 * m.in_features * m.out_features for m in head.modules() if isinstance(m, nn.Linear))


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def train(head: str, data: Digits, *, epochs: int = 15, seed: int = 0, batch_size: int = 32, lr: float = 2e-3,
          progress: bool = False) -> History:
    """Train the network with ``head`` on ``data`` with Adam; test accuracy after every epoch."""
    model = make_model(head, seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    order = torch.Generator().manual_seed(seed)  # the same batches for both heads
    history = History(head, sum(p.numel() for p in model.parameters()),
                      sum(p.numel() for p in model.fc.parameters()), head_flops(model.fc))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=epochs, desc=f"{HEAD_NAMES[head]:<12}", unit="epoch", leave=True)
    n = data.train_x.shape[0]
    for _ in range(epochs):
        start = time.perf_counter()
        model.train()
        total = 0.0
        for batch in torch.randperm(n, generator=order).split(batch_size):
            loss = F.cross_entropy(model(data.train_x[batch]), data.train_y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * batch.numel()
        history.epoch_seconds.append(time.perf_counter() - start)
        history.train_loss.append(total / n)
        history.test_accuracy.append(accuracy(model, data.test_x, data.test_y))
        if bar is not None:
            bar.set_postfix(loss=f"{history.train_loss[-1]:.3f}", test_acc=f"{history.test_accuracy[-1]:.1%}")
            bar.update()
    if bar is not None:
        bar.close()
    return history


def plot(histories: list[History], path: str) -> None:
    """Train loss and test accuracy per epoch, one line per head, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4.6))
    for h in histories:
        epochs = range(1, len(h.train_loss) + 1)
        label = f"{HEAD_NAMES[h.head]}: head {h.head_parameters:,} params, {h.head_flops:,} FLOPs"
        ax_loss.plot(epochs, h.train_loss, marker="o", markersize=3, label=label)
        ax_acc.plot(epochs, [100 * a for a in h.test_accuracy], marker="o", markersize=3, label=label)
    ax_loss.set(xlabel="epoch", ylabel="train loss (cross-entropy)", yscale="log", title="training loss")
    ax_acc.set(xlabel="epoch", ylabel="test accuracy (%)", title="test accuracy (8x8 digits)")
    for ax in (ax_loss, ax_acc):
        ax.grid(True, alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.legend(*ax_loss.get_legend_handles_labels(), loc="lower center", ncol=len(histories), fontsize=8)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(epochs: int = 15, seed: int = 0, out: str = "demo-results", progress: bool = True,
        threads: int = 1) -> list[History]:
    """Train every head, print its parameters, FLOPs, test accuracy and time per epoch, save ``out/demo.png``.

    ``threads``: ``torch.set_num_threads`` for the run (0: leave torch's choice). One by default: batches of
    32 images of 8x8 are too small to split, and on a busy machine a second thread mostly waits (measured on
    the 2-core development machine under load: 0.13 s per epoch with one thread, 0.1 to 1.4 s with two).
    """
    threads_before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        data = load_digits(seed)
        print(f"8x8 digits from scikit-learn: {data.train_x.shape[0]} training and {data.test_x.shape[0]} test "
              f"images, 10 classes; {epochs} epochs, seed {seed}, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads")
        histories = [train(head, data, epochs=epochs, seed=seed, progress=progress) for head in HEADS]
    finally:
        torch.set_num_threads(threads_before)
    hidden = spinal_hidden_width()
    print(f"\nheads: nn.Linear(512, 10); the dense two-layer head Linear(512, {hidden}) -> ReLU -> "
          f"Linear({hidden}, 10) of the spinal head's hidden width L*w; SpinalLinear(512, 10). "
          f"FLOPs: the head's forward, per sample")
    print(f"\n{'head':<15}{'head params':>12}{'head FLOPs':>12}{'network params':>16}{'test accuracy':>15}"
          f"{'best':>9}{'time / epoch':>15}")
    for h in histories:
        print(f"{HEAD_NAMES[h.head]:<15}{h.head_parameters:>12,}{h.head_flops:>12,}{h.parameters:>16,}"
              f"{h.test_accuracy[-1]:>15.2%}{max(h.test_accuracy):>9.2%}{h.seconds_per_epoch:>13.3f} s")
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "demo.png")
    plot(histories, path)
    print(f"\nwrote {path}")
    return histories
