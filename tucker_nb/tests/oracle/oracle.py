"""PyTorch/torchvision as the test oracle for tucker_nb (run with the project venv's python).

Subcommands write safetensors the Rust tests compare against; see each function's docstring.
"""
import argparse
import json
import os
import sys

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from torchvision import models

sys.path.insert(0, os.path.dirname(__file__))
from seed_tucker import TuckerCompressor  # noqa: E402

torch.set_grad_enabled(False)


def resnet18(num_classes):
    return models.resnet18(weights=None, num_classes=num_classes)


def make_weights(args):
    """A torchvision ResNet18 state_dict with random weights and non-trivial BN statistics, saved
    the way torchvision's own resnet18-*.pth is (torch.save of the state_dict, zip format)."""
    torch.manual_seed(args.seed)
    model = resnet18(args.num_classes)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.2, 0.2)
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.num_batches_tracked.fill_(args.seed + 7)
    torch.save(model.state_dict(), args.out)


def load_state(path):
    if path.endswith(".safetensors"):
        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def replace_convs(model, ranks):
    """The seed's compressed structure: each conv named in `ranks` becomes the seed's
    nn.Sequential(first, core, last) at [r_out, r_in], or, for [r], a 1×1 conv's two-layer SVD
    nn.Sequential(1×1 to r channels with the conv's stride, 1×1 back with a bias)."""
    compressor = TuckerCompressor()
    for name, rank in ranks.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        conv = getattr(parent, child)
        if len(rank) == 1:
            assert conv.kernel_size == (1, 1), name
            replacement = nn.Sequential(
                nn.Conv2d(conv.in_channels, rank[0], 1, stride=conv.stride, bias=False),
                nn.Conv2d(rank[0], conv.out_channels, 1, bias=True))
        else:
            replacement = compressor.compress_conv2d(conv, rank=tuple(rank))
        setattr(parent, child, replacement)
    return model


def conv_macs(model, size):
    """Multiply-accumulates of every Conv2d for one size×size image, counted by forward hooks."""
    total = 0

    def hook(module, inputs, output):
        nonlocal total
        per_pixel = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
        total += output[0].numel() * per_pixel

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    model.eval()(torch.zeros(1, 3, size, size))
    for h in handles:
        h.remove()
    return total


def reference(args):
    """torchvision's logits for the given weights on a seeded input batch (eval mode)."""
    state = load_state(args.weights)
    model = resnet18(state["fc.weight"].shape[0])
    model.load_state_dict(state, strict=True)
    torch.manual_seed(args.seed)
    x = torch.randn(args.batch, 3, args.size, args.size)
    save_file({"input": x, "logits": model.eval()(x).contiguous(),
               "conv_macs": torch.tensor([conv_macs(model, args.macs_size)], dtype=torch.int64)},
              args.out)


def seed_reconstruct(args):
    """Ŵ = U0 · S · U1ᵀ of the seed's TuckerCompressor for each layer in the ranks file."""
    state = load_state(args.weights)
    model = resnet18(state["fc.weight"].shape[0])
    model.load_state_dict(state, strict=True)
    ranks = json.load(open(args.ranks))
    compressor = TuckerCompressor()
    out = {}
    for name, rank in ranks.items():
        seq = compressor.compress_conv2d(model.get_submodule(name), rank=tuple(rank))
        first, core, last = (m.weight for m in seq)
        w = torch.einsum("or,rshw,si->oihw", last[:, :, 0, 0], core, first[:, :, 0, 0])
        out[name] = w.contiguous()
    save_file(out, args.out)


def seed_load(args):
    """Loads a tucker_nb compressed file with strict=True into the seed's compressed structure
    (ranks from the ranks file) and returns its logits on the given input, and its conv MACs."""
    state = load_file(args.weights)
    ranks = json.load(open(args.ranks))
    model = replace_convs(resnet18(state["fc.weight"].shape[0]), ranks)
    result = model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys, result
    x = load_file(args.input)["input"]
    save_file({"logits": model.eval()(x).contiguous(),
               "conv_macs": torch.tensor([conv_macs(model, args.macs_size)], dtype=torch.int64)},
              args.out)


def keys_load(args):
    """Rebuilds a tucker_nb file's model from its keys alone (scripts/torch_resnet.py, what the
    benchmarks and the scaling-out scripts use) and returns its logits on the given input and its
    conv MACs."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "..", "scripts"))
    from torch_resnet import load_state, resnet18_from_state
    model = resnet18_from_state(load_state(args.weights), args.weights)
    x = load_file(args.input)["input"]
    save_file({"logits": model.eval()(x).contiguous(),
               "conv_macs": torch.tensor([conv_macs(model, args.macs_size)], dtype=torch.int64)},
              args.out)


def image_folder(args):
    """torchvision's ImageFolder listing of a root: classes and (path, label) samples, as JSON."""
    from torchvision import datasets
    ds = datasets.ImageFolder(args.root)
    json.dump({"classes": ds.classes, "samples": [[p, int(l)] for p, l in ds.samples]}, open(args.out, "w"))


def eval_transform(args):
    """The seed's eval transform (Resize(size*256/224) + CenterCrop + ToTensor + Normalize) on every
    image of an ImageFolder root, in ImageFolder order."""
    from torchvision import datasets, transforms
    tf = transforms.Compose([
        transforms.Resize(args.size * 256 // 224), transforms.CenterCrop(args.size), transforms.ToTensor(),
        transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    ds = datasets.ImageFolder(args.root, transform=tf)
    save_file({"images": torch.stack([ds[i][0] for i in range(len(ds))]).contiguous()}, args.out)


def fit_errors(args, fit):
    """For each kernel `w{i}` (float64) and ranks `r{i}` of the file `args.input`, `fit(w, ranks)`'s
    reconstruction; saves `err{i}`, its relative error ‖W − Ŵ‖/‖W‖, to `args.out`."""
    import tensorly as tl
    tl.set_backend("pytorch")
    data = load_file(args.input)
    out = {}
    i = 0
    while f"w{i}" in data:
        w = data[f"w{i}"].double()
        rec = fit(w, [int(r) for r in data[f"r{i}"]])
        out[f"err{i}"] = (torch.linalg.norm(w - rec) / torch.linalg.norm(w)).reshape(1)
        i += 1
    save_file(out, args.out)


def partial_tucker(args):
    """tensorly's partial_tucker (HOOI from an SVD start) at ranks [r_out, r_in]."""
    import tensorly as tl
    from tensorly.decomposition import partial_tucker as tl_partial_tucker

    def fit(w, rank):
        (core, factors), _ = tl_partial_tucker(w, rank=rank, modes=[0, 1], n_iter_max=500, tol=1e-12)
        return tl.tenalg.multi_mode_dot(core, factors, modes=[0, 1])
    fit_errors(args, fit)


def parafac(args):
    """tensorly's parafac (CP by ALS, its defaults: SVD start, 100 sweeps, tol 1e-8) at rank [R]."""
    import tensorly as tl
    from tensorly.decomposition import parafac as tl_parafac

    def fit(w, rank):
        return tl.cp_to_tensor(tl_parafac(w, rank=rank[0], init="svd", random_state=0))
    fit_errors(args, fit)


def run_export(args):
    """Logits of an exported model (ONNX in ONNX Runtime, or TorchScript through torch.jit.load)
    for `input`'s `images`, written as `logits`."""
    images = load_file(args.input)["images"]
    if args.format == "onnx":
        import onnxruntime
        session = onnxruntime.InferenceSession(args.model, providers=["CPUExecutionProvider"])
        logits = torch.from_numpy(session.run(["logits"], {"images": images.numpy()})[0])
    else:
        logits = torch.jit.load(args.model, map_location="cpu").eval()(images)
    save_file({"logits": logits.contiguous()}, args.out)


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("make-weights")
    a.add_argument("out")
    a.add_argument("--num-classes", type=int, default=1000)
    a.add_argument("--seed", type=int, default=0)
    a = sub.add_parser("reference")
    a.add_argument("weights")
    a.add_argument("out")
    a.add_argument("--size", type=int, default=64)
    a.add_argument("--batch", type=int, default=2)
    a.add_argument("--seed", type=int, default=1)
    a.add_argument("--macs-size", type=int, default=224)
    a = sub.add_parser("seed-reconstruct")
    a.add_argument("weights")
    a.add_argument("ranks")
    a.add_argument("out")
    a = sub.add_parser("seed-load")
    a.add_argument("weights")
    a.add_argument("ranks")
    a.add_argument("input")
    a.add_argument("out")
    a.add_argument("--macs-size", type=int, default=224)
    a = sub.add_parser("keys-load")
    a.add_argument("weights")
    a.add_argument("input")
    a.add_argument("out")
    a.add_argument("--macs-size", type=int, default=224)
    a = sub.add_parser("partial-tucker")
    a.add_argument("input")
    a.add_argument("out")
    a = sub.add_parser("parafac")
    a.add_argument("input")
    a.add_argument("out")
    a = sub.add_parser("image-folder")
    a.add_argument("root")
    a.add_argument("out")
    a = sub.add_parser("eval-transform")
    a.add_argument("root")
    a.add_argument("out")
    a.add_argument("--size", type=int, default=32)
    a = sub.add_parser("run-export")
    a.add_argument("format", choices=("onnx", "torchscript"))
    a.add_argument("model")
    a.add_argument("input")
    a.add_argument("out")
    args = p.parse_args()
    {"run-export": run_export, "make-weights": make_weights, "reference": reference, "seed-reconstruct": seed_reconstruct,
     "seed-load": seed_load, "keys-load": keys_load, "image-folder": image_folder, "eval-transform": eval_transform, "partial-tucker": partial_tucker,
     "parafac": parafac}[args.cmd](args)


if __name__ == "__main__":
    main()
