"""Model surgery: swap an ``nn.Linear`` in a model for a :class:`spinal_ops.SpinalLinear`."""

from __future__ import annotations

import re

from torch import nn

from .module import SpinalLinear

_PATH = re.compile(r"(?:[^.\[\]]+|\[-?\d+\])(?:\.[^.\[\]]+|\[-?\d+\])*")
_PATH_TOKEN = re.compile(r"\[(-?\d+)\]|([^.\[\]]+)")


def replace_linear(model: nn.Module, name: str = "fc", **spinal_kwargs) -> SpinalLinear:
    """Replace the ``nn.Linear`` at ``name`` in ``model`` by a :class:`SpinalLinear` of the same in/out features.

    ``name`` is a dotted path as in ``model.named_modules()`` (``"fc"``, ``"head"``, ``"classifier.6"``), where a
    bracketed index picks a child by position (``"classifier[-1]"``, ``"blocks[2].fc"``). The new layer is
    on the old one's device and dtype, in its train/eval mode, with a bias when it had one (unless
    ``spinal_kwargs`` say otherwise); ``spinal_kwargs`` go to :class:`SpinalLinear`. Returns the new layer
    (already in the model; its parameters are new, so build the optimizer afterwards).

    Raises ``ValueError`` (a path that does not parse), ``AttributeError`` (no such child), ``IndexError``
    (position out of range) or ``TypeError`` (not an ``nn.Linear``), each naming the path.
    """
    where = "replace_linear"
    if not isinstance(name, str) or not _PATH.fullmatch(name):
        raise ValueError(f"{where}: cannot parse module path {name!r}; write e.g. 'fc', 'classifier.6' or "
                         "'classifier[-1]'")
    target = _target(model, name, where)
    current = model.get_submodule(target)
    if not isinstance(current, nn.Linear):
        raise TypeError(f"{where}: {name!r} is {type(current).__name__}, not nn.Linear")
    weight = current.weight
    kwargs = {"bias": current.bias is not None, **spinal_kwargs, "device": weight.device, "dtype": weight.dtype}
    spinal = SpinalLinear(current.in_features, current.out_features, **kwargs)
    spinal.train(current.training)
    model.set_submodule(target, spinal)
    return spinal


def _target(model: nn.Module, name: str, where: str) -> str:
    """The dotted name (as ``get_submodule`` takes it) of the module at ``name``, whose bracketed indices pick
    children by position; raises naming the part of the path that does not resolve."""
    parts: list[str] = []
    walked = ""
    for index, attr in _PATH_TOKEN.findall(name):
        parent = model.get_submodule(".".join(parts))
        parent_path = repr(walked) if walked else "the model"
        children = list(parent._modules)
        if attr:
            walked = f"{walked}.{attr}" if walked else attr
            if attr not in children:
                raise AttributeError(f"{where}: {type(model).__name__} has no submodule {walked!r} ({parent_path} "
                                     f"is {type(parent).__name__} with children: {', '.join(children) or 'none'})")
            parts.append(attr)
        else:
            walked = f"{walked}[{index}]"
            if not -len(children) <= int(index) < len(children):
                raise IndexError(f"{where}: index {index} in {walked!r} is out of range: {parent_path} is "
                                 f"{type(parent).__name__} with {len(children)} children")
            parts.append(children[int(index)])
    return ".".join(parts)
