"""Exports a tucker_nb model file to ONNX or TorchScript, then checks the export against tucker_nb's
own logits. `tucker-nb export` runs this (embedded in the binary) after loading the file itself, and
hands it CHECK: a safetensors file with `images` (N×3×S×S) and `logits` (tucker_nb's eval-mode
output for them).

The model is the seed's PyTorch structure rebuilt from the file's keys (torch_resnet.py), in eval
mode. ONNX: torch.onnx.export (the torch.export-based exporter) with a dynamic batch dimension,
input `images`, output `logits`, weights inside the one file. TorchScript: torch.jit.script, which
keeps the seed's module names (its state_dict is the file's). The saved file is then loaded by
ONNX Runtime (CPU) or torch.jit.load and run on CHECK's images, all of them and the first alone
(another batch size than the export's example): the largest |difference| from tucker_nb's logits
must be at most --tolerance. Prints one JSON line: format, max_abs_diff, batch sizes checked."""
import argparse
import contextlib
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from torch_resnet import load_state, resnet18_from_state  # noqa: E402


def needs(module, why):
    try:
        return __import__(module)
    except ImportError:
        sys.exit(f"export: {sys.executable} has no `{module}` ({why}): run scripts/setup, or "
                 "pass tucker-nb export --python a Python that has it")


def export_onnx(model, example, out):
    needs("onnx", "torch.onnx.export writes ONNX with it")
    needs("onnxscript", "torch.onnx.export translates with it")
    batch = torch.export.Dim("batch", min=1)
    # The exporter reports its steps on stdout, which carries this script's JSON line.
    with contextlib.redirect_stdout(sys.stderr):
        torch.onnx.export(model, (example,), str(out), input_names=["images"],
                          output_names=["logits"], dynamo=True, external_data=False,
                          dynamic_shapes=({0: batch},))


def run_onnx(path):
    ort = needs("onnxruntime", "the export is checked in ONNX Runtime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run(["logits"], {"images": x.numpy()})[0])


def export_torchscript(model, example, out):
    scripted = torch.jit.script(model)
    torch.jit.save(scripted, str(out))


def run_torchscript(path):
    loaded = torch.jit.load(str(path), map_location="cpu").eval()

    def run(x):
        with torch.no_grad():
            return loaded(x)
    return run


FORMATS = {"onnx": (export_onnx, run_onnx), "torchscript": (export_torchscript, run_torchscript)}


def main(argv):
    p = argparse.ArgumentParser(prog="export.py")
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--format", required=True, choices=sorted(FORMATS))
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--check", required=True, type=Path)
    p.add_argument("--tolerance", type=float, default=1e-4)
    args = p.parse_args(argv)
    from safetensors.torch import load_file

    check = load_file(str(args.check))
    images, ours = check["images"], check["logits"]
    try:
        model = resnet18_from_state(load_state(args.model), args.model).eval()
    except ValueError as e:
        sys.exit(f"export: {e}")
    export, load = FORMATS[args.format]
    example = torch.zeros(2, *images.shape[1:])
    with torch.no_grad():
        export(model, example, args.out)
    run = load(args.out)
    diffs = {}
    for n in sorted({len(images), 1}):
        got = run(images[:n])
        if got.shape != ours[:n].shape:
            sys.exit(f"export: the exported model gives {list(got.shape)} logits for a batch of "
                     f"{n}, tucker_nb {list(ours[:n].shape)}")
        diffs[n] = (got - ours[:n]).abs().max().item()
    worst = max(diffs.values())
    print(json.dumps({"format": args.format, "max_abs_diff": worst,
                      "batch_sizes": sorted(diffs), "tolerance": args.tolerance}))
    if not worst <= args.tolerance:
        sys.exit(f"export: the {args.format} export's logits differ from tucker_nb's by {worst:.3g} "
                 f"(more than {args.tolerance:g}); nothing written")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
