"""ResNet18 in PyTorch rebuilt from a tucker_nb model file's keys alone: each conv slot is dense
(`name.weight`), the seed's Tucker-2 nn.Sequential(first 1×1, core k×k, last 1×1)
(`name.{0,1,2}.weight`) or two layers (`name.{0,1}.weight`: a 1×1 conv's SVD, or a k×k conv's
Tucker-1 with the k×k kernel first or last), with shapes, strides and biases from the file; the
stride, padding and dilation go to the layer with the spatial kernel (the first of two 1×1s).
Loaded strictly: a key that fits no slot is an error naming the file."""
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
    n = 3 if has("2.weight") else 2 if has("1.weight") else 0
    if n == 0:
        raise ValueError(f"{path}: no weights for conv {name} (neither {name}.weight nor its factors)")
    shapes = [state[f"{name}.{i}.weight"].shape for i in range(n)]
    _check_chain(conv, shapes, name, path)
    spatial = next((i for i, s in enumerate(shapes) if tuple(s[2:]) != (1, 1)), 0)
    layers = []
    for i, s in enumerate(shapes):
        geometry = (dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation)
                    if i == spatial else {})
        layers.append(nn.Conv2d(s[1], s[0], tuple(s[2:]), bias=has(f"{i}.bias"), **geometry))
    return nn.Sequential(*layers)


def _check_chain(conv, shapes, name, path):
    """Refuses factors that cannot replace `conv`: each a 4-d kernel, channels chained from the
    conv's inputs to its outputs, the conv's spatial kernel on exactly one factor (none when 1×1)."""
    key = lambda i: f"{name}.{i}.weight"  # noqa: E731
    for i, s in enumerate(shapes):
        if len(s) != 4 or min(s) < 1:
            raise ValueError(f"{path}: {key(i)} has shape {list(s)}, not a conv kernel")
    if shapes[0][1] != conv.in_channels:
        raise ValueError(f"{path}: {key(0)} has shape {list(shapes[0])}: its {shapes[0][1]} input "
                         f"channels do not fit conv {name}'s {conv.in_channels}")
    for i in range(1, len(shapes)):
        if shapes[i][1] != shapes[i - 1][0]:
            raise ValueError(f"{path}: {key(i)} has shape {list(shapes[i])}: its {shapes[i][1]} "
                             f"input channels do not match {key(i - 1)}'s {shapes[i - 1][0]} outputs")
    if shapes[-1][0] != conv.out_channels:
        raise ValueError(f"{path}: {key(len(shapes) - 1)} has shape {list(shapes[-1])}: its "
                         f"{shapes[-1][0]} outputs do not fit conv {name}'s {conv.out_channels}")
    kernels = [tuple(s[2:]) for s in shapes]
    spatial = [k for k in kernels if k != (1, 1)]
    want = [] if tuple(conv.kernel_size) == (1, 1) else [tuple(conv.kernel_size)]
    if spatial != want:
        rule = f"1×1 but for one {want[0]}" if want else "all 1×1"
        raise ValueError(f"{path}: conv {name}'s factors have kernels {kernels}; those of a "
                         f"{tuple(conv.kernel_size)} conv are {rule}")


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
    except RuntimeError as e:  # PyTorch's message spans lines: one line, naming the keys
        raise ValueError(f"{path}: {' '.join(str(e).split())}") from None
    return model


def slot_names(model):
    """Names of the factorised conv slots (nn.Sequential in a conv's place)."""
    return [n for n, m in model.named_modules()
            if isinstance(m, nn.Sequential) and len(m) in (2, 3)
            and all(isinstance(c, nn.Conv2d) for c in m)]
