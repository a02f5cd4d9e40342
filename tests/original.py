"""Spinal layers written like the original SpinalNet scripts: literal ``nn.Linear`` chains, ``nn.Sequential`` blocks
with dropout and batch norm, heads on spatial positions, several chains in one network.

They are independent of spinal_ops (only ``torch.nn``): the tests load them into ``SpinalLinear`` with
``from_linears`` and compare outputs and every gradient.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn


def make_activation(name: str, negative_slope: float = 0.01) -> nn.Module:
    return {
        "relu": nn.ReLU(),
        "leaky_relu": nn.LeakyReLU(negative_slope),
        "tanh": nn.Tanh(),
        "sigmoid": nn.Sigmoid(),
        "identity": nn.Identity(),
        "gelu": nn.GELU(),
        "silu": nn.SiLU(),
    }[name]


class HalvesHead(nn.Module):
    """The fixed 4-layer head of the MNIST/CIFAR scripts: alternating halves ``x[:, 0:half]``, ``x[:, half:2*half]``."""

    def __init__(self, in_features: int, width: int, out: int):
        super().__init__()
        self.in_features = in_features
        self.half = int(np.round(in_features / 2))
        half = self.half
        self.fc_spinal_layer1 = nn.Sequential(nn.Linear(half, width), nn.ReLU(inplace=True))
        self.fc_spinal_layer2 = nn.Sequential(nn.Linear(half + width, width), nn.ReLU(inplace=True))
        self.fc_spinal_layer3 = nn.Sequential(nn.Linear(half + width, width), nn.ReLU(inplace=True))
        self.fc_spinal_layer4 = nn.Sequential(nn.Linear(half + width, width), nn.ReLU(inplace=True))
        self.fc_out = nn.Linear(width * 4, out)

    def forward(self, x):
        half = self.half
        x1 = self.fc_spinal_layer1(x[:, 0:half])
        x2 = self.fc_spinal_layer2(torch.cat([x[:, half : 2 * half], x1], dim=1))
        x3 = self.fc_spinal_layer3(torch.cat([x[:, 0:half], x2], dim=1))
        x4 = self.fc_spinal_layer4(torch.cat([x[:, half : 2 * half], x3], dim=1))
        x = torch.cat([x1, x2, x3, x4], dim=1)
        return self.fc_out(x)

    def linears(self):
        layers = [self.fc_spinal_layer1[0], self.fc_spinal_layer2[0], self.fc_spinal_layer3[0],
                  self.fc_spinal_layer4[0]]
        return layers, self.fc_out


class CustomizableSpinal(nn.Module):
    """The customizable model: ``x`` tiled until it is ``L * c`` wide, sub-layer ``i`` reads ``[i*c, (i+1)*c)``.

    ``shared=True`` is "SpinalNet SW": sub-layers 1.. are one module; ``slots`` ties sub-layers in any pattern
    (sub-layer i calls module ``slots[i]``). ``head=False`` returns the concatenation.
    """

    def __init__(self, in_features, num_splits, width, num_layers, out, activation="relu", negative_slope=0.01,
                 shared=False, head=True, bias=True, slots=None):
        super().__init__()
        self.in_features = in_features
        self.chunk = int(np.round(in_features / num_splits))
        self.num_layers = num_layers
        self.act = make_activation(activation, negative_slope)
        first = nn.Linear(self.chunk, width, bias=bias)
        rest = [nn.Linear(self.chunk + width, width, bias=bias) for _ in range(num_layers - 1)]
        if shared and rest:
            rest = [rest[0]] * len(rest)
        if slots is not None:
            rest = [rest[s - 1] for s in slots[1:]]
        self.layers = nn.ModuleList([first, *rest])  # a repeated module is registered once
        self._order = [first, *rest]
        self.fc_out = nn.Linear(width * num_layers, out, bias=bias) if head else None

    def forward(self, x):
        c = self.chunk
        reps = math.ceil(self.num_layers * c / x.shape[1])
        xt = torch.cat([x] * reps, dim=1)
        h = self.act(self._order[0](xt[:, 0:c]))
        outs = [h]
        for i in range(1, self.num_layers):
            h = self.act(self._order[i](torch.cat([xt[:, i * c : (i + 1) * c], h], dim=1)))
            outs.append(h)
        hcat = torch.cat(outs, dim=1)
        return self.fc_out(hcat) if self.fc_out is not None else hcat

    def linears(self):
        return list(self._order), self.fc_out


class TiedRegressionSpinal(nn.Module):
    """``Regression/Regression_NN_and_SpinalNet.py``'s SpinalNet (and the transfer-learning head's): six sub-layers
    on alternating halves that call ``fc1, fc2, fc3, fc4, fc3, fc4`` (``fc5``, ``fc6`` declared, never used)."""

    def __init__(self, half_in_size: int = 4, first_hl: int = 50, out: int = 1):
        super().__init__()
        self.in_features = 2 * half_in_size
        self.half = half_in_size
        self.lru = nn.LeakyReLU()
        self.fc1 = nn.Linear(half_in_size, first_hl)
        self.fc2 = nn.Linear(half_in_size + first_hl, first_hl)
        self.fc3 = nn.Linear(half_in_size + first_hl, first_hl)
        self.fc4 = nn.Linear(half_in_size + first_hl, first_hl)
        self.fc5 = nn.Linear(half_in_size + first_hl, first_hl)
        self.fc6 = nn.Linear(half_in_size + first_hl, first_hl)
        self.fcx = nn.Linear(first_hl * 6, out)

    def forward(self, x):
        h = self.half
        x1 = self.lru(self.fc1(x[:, 0:h]))
        x2 = self.lru(self.fc2(torch.cat([x[:, h : h * 2], x1], dim=1)))
        x3 = self.lru(self.fc3(torch.cat([x[:, 0:h], x2], dim=1)))
        x4 = self.lru(self.fc4(torch.cat([x[:, h : h * 2], x3], dim=1)))
        x5 = self.lru(self.fc3(torch.cat([x[:, 0:h], x4], dim=1)))
        x6 = self.lru(self.fc4(torch.cat([x[:, h : h * 2], x5], dim=1)))
        return self.fcx(torch.cat([x1, x2, x3, x4, x5, x6], dim=1))

    def linears(self):
        return [self.fc1, self.fc2, self.fc3, self.fc4, self.fc3, self.fc4], self.fcx


def packed_grads(layers, head, chunk: int) -> dict:
    """Gradients of an original chain, packed like SpinalLinear's parameters (read after ``backward``): one slot
    per distinct module of ``layers``, in order of first appearance (tied sub-layers are one module)."""
    slots = list({id(lin): lin for lin in layers}.values())
    grads = {
        "weight_x": torch.stack([lin.weight.grad[:, :chunk] for lin in slots]),
        "weight_h": torch.stack([lin.weight.grad[:, chunk:] for lin in slots[1:]])
        if len(slots) > 1
        else layers[0].weight.new_zeros(0, layers[0].out_features, layers[0].out_features),
    }
    if layers[0].bias is not None:
        grads["bias"] = torch.stack([lin.bias.grad for lin in slots])
    if head is not None:
        grads["head_weight"] = head.weight.grad
        if head.bias is not None:
            grads["head_bias"] = head.bias.grad
    return grads


class BlockHead(nn.Module):
    """The VGG / transfer-learning head, as those scripts write it: one ``nn.Sequential`` per sub-layer.

    ``split="halves"``: sub-layer ``i`` reads ``x[:, 0:half]`` or ``x[:, half:2*half]`` alternately (the fixed
    heads); ``split="tiled"``: ``x`` tiled until ``L * c`` wide, sub-layer ``i`` reads ``[i*c, (i+1)*c)`` (the
    customizable model). ``shared=True`` repeats one block for sub-layers 1.. (SpinalNet SW).
    """

    def __init__(self, in_features, num_splits, width, num_layers, out, p, batch_norm=True, activation="relu",
                 negative_slope=0.01, shared=False, head=True, split="tiled"):
        super().__init__()
        self.chunk = int(np.round(in_features / num_splits))
        self.num_splits = num_splits
        self.num_layers = num_layers
        self.split = split
        c = self.chunk

        def block(fan_in):
            parts = [nn.Dropout(p=p), nn.Linear(fan_in, width)]
            parts += [nn.BatchNorm1d(width)] if batch_norm else []
            parts += [make_activation(activation, negative_slope)]
            return nn.Sequential(*parts)

        first = block(c)
        rest = [block(c + width) for _ in range(num_layers - 1)]
        if shared and rest:
            rest = [rest[0]] * len(rest)
        self.fc_spinal_layers = nn.ModuleList([first, *rest])
        self._order = [first, *rest]
        self.fc_out = nn.Sequential(nn.Dropout(p=p), nn.Linear(width * num_layers, out)) if head else None

    def forward(self, x):
        c = self.chunk
        if self.split == "tiled":
            xt = torch.cat([x] * math.ceil(self.num_layers * c / x.shape[1]), dim=1)
            chunks = [xt[:, i * c : (i + 1) * c] for i in range(self.num_layers)]
        else:
            chunks = [x[:, (i % self.num_splits) * c : (i % self.num_splits + 1) * c] for i in range(self.num_layers)]
        h = self._order[0](chunks[0])
        outs = [h]
        for i in range(1, self.num_layers):
            h = self._order[i](torch.cat([chunks[i], h], dim=1))
            outs.append(h)
        hcat = torch.cat(outs, dim=1)
        return self.fc_out(hcat) if self.fc_out is not None else hcat

    def blocks(self) -> list:
        """The sub-layers' blocks in order (a shared block repeated): what ``from_linears`` takes."""
        return list(self._order)

    def linears(self):
        return [blk[1] for blk in self._order], (self.fc_out[1] if self.fc_out is not None else None)

    def norms(self):
        return [blk[2] for blk in self._order if isinstance(blk[2], nn.BatchNorm1d)]


class SpinalResNetHead(nn.Module):
    """``CIFAR-10/ResNet_default_and_SpinalFC_CIFAR10.py``'s SpinalResNet head, as written there: sub-layer i reads
    the channels of one spatial position of a ``(B, C, 2, 2)`` map, ``out1[:, :, 0, 0]``, ``[0, 1]``, ``[1, 0]``,
    ``[1, 1]``."""

    def __init__(self, channels: int, first_hl: int, num_classes: int):
        super().__init__()
        self.relu = nn.ReLU(inplace=True)
        self.fc1 = nn.Linear(channels, first_hl)
        self.fc1_1 = nn.Linear(channels + first_hl, first_hl)
        self.fc1_2 = nn.Linear(channels + first_hl, first_hl)
        self.fc1_3 = nn.Linear(channels + first_hl, first_hl)
        self.fc_layer = nn.Linear(first_hl * 4, num_classes)

    def forward(self, out1):
        x1 = self.relu(self.fc1(out1[:, :, 0, 0]))
        x2 = self.relu(self.fc1_1(torch.cat([out1[:, :, 0, 1], x1], dim=1)))
        x3 = self.relu(self.fc1_2(torch.cat([out1[:, :, 1, 0], x2], dim=1)))
        x4 = self.relu(self.fc1_3(torch.cat([out1[:, :, 1, 1], x3], dim=1)))
        return self.fc_layer(torch.cat([x1, x2, x3, x4], dim=1))


class Arch2Head(nn.Module):
    """``MNIST/Arch2_MNIST.py``'s head: three spinal chains on three different inputs (the conv2 features, the
    conv1 features, the raw pixels), each on alternating halves, concatenated (raw, conv1, conv2 order, as the
    script's ``cat([x, x0])`` builds it), then ``fc2 -> relu -> fc3``. Sizes shrunk for the test."""

    def __init__(self, sizes=(12, 20, 16), layers=(4, 4, 5), width=3):
        super().__init__()
        self.halves = [s // 2 for s in sizes]
        self.chains = nn.ModuleList(
            nn.ModuleList([nn.Linear(h, width)] + [nn.Linear(h + width, width) for _ in range(n - 1)])
            for h, n in zip(self.halves, layers, strict=True))
        self.fc2 = nn.Linear(width * sum(layers), 7)
        self.fc3 = nn.Linear(7, 4)

    @staticmethod
    def chain(x, linears, half):
        outs, h = [], None
        for i, lin in enumerate(linears):
            part = x[:, 0:half] if i % 2 == 0 else x[:, half : half * 2]
            h = torch.relu(lin(part if h is None else torch.cat([part, h], dim=1)))
            outs.append(h)
        return torch.cat(outs, dim=1)

    def forward(self, x_conv2, x_conv1, x_raw):
        hs = [self.chain(x, lins, half) for x, lins, half in zip((x_conv2, x_conv1, x_raw), self.chains, self.halves,
                                                                  strict=True)]
        return self.fc3(torch.relu(self.fc2(torch.cat([hs[2], hs[1], hs[0]], dim=1))))
