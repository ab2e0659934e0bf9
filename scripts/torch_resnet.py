"""ResNet18 in PyTorch rebuilt from a tucker_nb model file's keys alone: each conv is dense
(`name.weight`), the seed's Tucker-2 nn.Sequential(first 1×1, core, last 1×1) (`name.{0,1,2}.weight`)
or a 1×1 conv's two-layer SVD (`name.{0,1}.weight`), with shapes, strides and biases from the file.
Loaded strictly: a key that fits no slot is an error naming the key."""
import torch
import torch.nn as nn
from torchvision import models


def load_state(path):
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def _slot(conv, state, name, path):
    """The module for conv slot `name` (a torchvision nn.Conv2d) as the keys describe it."""
    has = lambda k: f"{name}.{k}" in state  # noqa: E731
    if has("weight"):
        return conv
    bias = lambda i: has(f"{i}.bias")  # noqa: E731
    if has("2.weight"):
        first, core, last = (state[f"{name}.{i}.weight"].shape for i in range(3))
        return nn.Sequential(
            nn.Conv2d(first[1], first[0], 1, bias=bias(0)),
            nn.Conv2d(core[1], core[0], core[2:], stride=conv.stride, padding=conv.padding,
                      dilation=conv.dilation, bias=bias(1)),
            nn.Conv2d(last[1], last[0], 1, bias=bias(2)))
    if has("1.weight"):
        first, last = (state[f"{name}.{i}.weight"].shape for i in range(2))
        return nn.Sequential(
            nn.Conv2d(first[1], first[0], 1, stride=conv.stride, bias=bias(0)),
            nn.Conv2d(last[1], last[0], 1, bias=bias(1)))
    raise ValueError(f"{path}: no weights for conv {name} (neither {name}.weight nor its factors)")


def resnet18_from_state(state, path="model"):
    """torchvision's resnet18 with every conv slot shaped as `state` says, `state` loaded strictly."""
    if "fc.weight" not in state or state["fc.weight"].dim() != 2:
        raise ValueError(f"{path}: fc.weight missing or not a matrix")
    model = models.resnet18(weights=None, num_classes=state["fc.weight"].shape[0])
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    for name, conv in convs:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, _slot(conv, state, name, path))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path}: {e}") from None
    return model


def slot_names(model):
    """Names of the factorised conv slots (nn.Sequential in a conv's place)."""
    return [n for n, m in model.named_modules()
            if isinstance(m, nn.Sequential) and len(m) in (2, 3)
            and all(isinstance(c, nn.Conv2d) for c in m)]
