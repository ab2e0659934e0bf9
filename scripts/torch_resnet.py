"""ResNet18 in PyTorch rebuilt from a tucker_nb model file: each conv slot is dense
(`name.weight`), the seed's Tucker-2 nn.Sequential(first 1×1, core k×k, last 1×1)
(`name.{0,1,2}.weight`), two layers (`name.{0,1}.weight`: a 1×1 conv's SVD, or a k×k conv's
Tucker-1 with the k×k kernel first or last) or a CP (`name.{0,1,2,3}.weight`: 1×1, depthwise kh×1,
depthwise 1×kw, 1×1), with shapes, strides and biases from the file; the stride, padding and
dilation go to the layer with the spatial kernel (the first of two 1×1s), a CP's split between its
depthwise layers by dimension.
A safetensors file tucker_nb wrote says each slot's form in its metadata (`tucker_nb.forms`:
{name: {"form": ..., "ranks": [r_out, r_in]}}), and the factors must agree with it; for other
files the form is inferred from the keys. Loaded strictly: a key that fits no slot is an error
naming the file."""
import json
import struct

import torch
import torch.nn as nn
from torchvision import models


def load_state(path):
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


# Layers of each factorised form, and which of them has the spatial kernel and the geometry.
FORM_LAYERS = {"tucker2": (3, 1), "svd": (2, 0), "tucker1-out": (2, 0), "tucker1-in": (2, 1),
               "cp": (4, 1)}


def load_forms(path):
    """{slot name: {"form", "ranks"}} from a safetensors file's metadata; {} for other files
    and files without it."""
    if not str(path).endswith(".safetensors"):
        return {}
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    forms = header.get("__metadata__", {}).get("tucker_nb.forms")
    return json.loads(forms) if forms else {}


def _ranks(form, shapes):
    """(r_out, r_in) of a factorised slot's kernels, as tucker_nb's metadata records them."""
    if form == "tucker2":
        return [shapes[1][0], shapes[1][1]]
    if form == "svd":
        return [shapes[0][0], shapes[0][0]]
    if form == "tucker1-out":
        return [shapes[0][0], shapes[0][1]]
    if form == "cp":
        return [shapes[0][0], shapes[0][0]]
    return [shapes[1][0], shapes[1][1]]


def _slot(conv, state, name, path, said=None):
    """The module for conv slot `name` (a torchvision nn.Conv2d): in the form `said` (a metadata
    record) when given, else as the keys describe it."""
    has = lambda k: f"{name}.{k}" in state  # noqa: E731
    form = said["form"] if said else None
    if form == "dense" or (form is None and has("weight")):
        return conv
    if form is None:
        n = 4 if has("3.weight") else 3 if has("2.weight") else 2 if has("1.weight") else 0
    elif form in FORM_LAYERS:
        n = FORM_LAYERS[form][0]
    else:
        raise ValueError(f"{path}: metadata gives conv {name} the unknown form {form!r}")
    if n == 0 or not all(has(f"{i}.weight") for i in range(n)):
        raise ValueError(f"{path}: no weights for conv {name} (neither {name}.weight nor its factors)")
    shapes = [state[f"{name}.{i}.weight"].shape for i in range(n)]
    if n == 4:
        return _cp_slot(conv, shapes, said, name, path, has)
    _check_chain(conv, shapes, name, path)
    spatial = next((i for i, s in enumerate(shapes) if tuple(s[2:]) != (1, 1)), 0)
    if form is not None:
        has_kernel = any(tuple(s[2:]) != (1, 1) for s in shapes)
        misplaced = has_kernel and spatial != FORM_LAYERS[form][1]
        if misplaced or list(said.get("ranks") or []) != _ranks(form, shapes):
            raise ValueError(f"{path}: conv {name}'s factors {[list(s) for s in shapes]} are not "
                             f"the {form} {said.get('ranks')} its metadata says")
    layers = []
    for i, s in enumerate(shapes):
        geometry = (dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation)
                    if i == spatial else {})
        layers.append(nn.Conv2d(s[1], s[0], tuple(s[2:]), bias=has(f"{i}.bias"), **geometry))
    return nn.Sequential(*layers)


def _cp_slot(conv, shapes, said, name, path, has):
    """A CP slot: 1×1 (C_in → R), depthwise kh×1 with the height's stride, padding and dilation,
    depthwise 1×kw with the width's, 1×1 (R → C_out)."""
    rank = shapes[0][0]
    kh, kw = conv.kernel_size
    want = [(rank, conv.in_channels, 1, 1), (rank, 1, kh, 1), (rank, 1, 1, kw),
            (conv.out_channels, rank, 1, 1)]
    found = [tuple(s) for s in shapes]
    if found != want or (said and list(said.get("ranks") or []) != [rank, rank]):
        raise ValueError(f"{path}: conv {name}'s factors {[list(s) for s in shapes]} are not a CP of "
                         f"conv {name} ({[list(s) for s in want]})")
    along = lambda d, value, neutral: tuple(value[d] if i == d else neutral for i in range(2))  # noqa: E731
    depthwise = lambda d, kernel: nn.Conv2d(  # noqa: E731
        rank, rank, kernel, stride=along(d, conv.stride, 1), padding=along(d, conv.padding, 0),
        dilation=along(d, conv.dilation, 1), groups=rank, bias=has(f"{1 + d}.bias"))
    return nn.Sequential(
        nn.Conv2d(conv.in_channels, rank, 1, bias=has("0.bias")),
        depthwise(0, (kh, 1)), depthwise(1, (1, kw)),
        nn.Conv2d(rank, conv.out_channels, 1, bias=has("3.bias")))


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
    """torchvision's resnet18 with every conv slot shaped as `state` says (in the forms the file
    at `path` records, when it does), `state` loaded strictly."""
    if "fc.weight" not in state or state["fc.weight"].dim() != 2:
        raise ValueError(f"{path}: fc.weight missing or not a matrix")
    forms = load_forms(path) if str(path).endswith(".safetensors") else {}
    model = models.resnet18(weights=None, num_classes=state["fc.weight"].shape[0])
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    unknown = sorted(set(forms) - {n for n, _ in convs})
    if unknown:
        raise ValueError(f"{path}: metadata names {unknown[0]}, which is no conv of a ResNet18")
    for name, conv in convs:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, _slot(conv, state, name, path, forms.get(name)))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:  # PyTorch's message spans lines: one line, naming the keys
        raise ValueError(f"{path}: {' '.join(str(e).split())}") from None
    return model


def slot_names(model):
    """Names of the factorised conv slots (nn.Sequential in a conv's place)."""
    return [n for n, m in model.named_modules()
            if isinstance(m, nn.Sequential) and len(m) in (2, 3, 4)
            and all(isinstance(c, nn.Conv2d) for c in m)]
