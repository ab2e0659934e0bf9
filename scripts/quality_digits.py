"""Real images for the compression-quality benchmark (scripts/quality-bench), from a package
registry: the UCI handwritten digits (1797 scanned 8×8 images, 10 classes) that scikit-learn's
wheel ships, fetched with `pip download` (pip checks PyPI's hashes) and unpacked without
installing scikit-learn.

  prepare --out DIR [--size 64] [--held-out-share 0.05]
                                  ImageFolder DIR/{train,val}/<digit>/*.png, upscaled (bilinear),
                                  a seeded stratified 80/20 split, and DIR/held_out/<digit>/*.png:
                                  that share (5 %) of each digit's training share, moved out of
                                  train/ (the images the fine-tune chooses its epoch on, which the
                                  model below never sees: --held-out-data)
  train --data DIR --out FILE     torchvision's ResNet18 trained on DIR/train from random weights,
                                  saved as a torchvision state_dict; prints the val top-1
  table RUN...                    the benchmark's table from the runs' sweep.csv files
"""
import argparse
import csv
import glob
import gzip
import io
import os
import random
import statistics
import subprocess
import sys
import tempfile
import zipfile

SKLEARN = "scikit-learn==1.9.1"
DIGITS = "sklearn/datasets/data/digits.csv.gz"


def prepare(a):
    from PIL import Image
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                        "-q", "-d", tmp, SKLEARN], check=True)
        wheel = glob.glob(f"{tmp}/scikit_learn-*.whl")[0]
        text = gzip.decompress(zipfile.ZipFile(wheel).read(DIGITS)).decode()
    rows = [list(map(float, line.split(","))) for line in text.splitlines() if line.strip()]
    by_class = {}
    for r in rows:
        by_class.setdefault(int(r[-1]), []).append(r[:-1])
    rng = random.Random(0)
    n = 0
    for label, images in sorted(by_class.items()):
        rng.shuffle(images)
        cut = int(len(images) * 0.8)
        held = round(cut * a.held_out_share)
        for split, part in (("held_out", images[:held]), ("train", images[held:cut]),
                            ("val", images[cut:])):
            folder = os.path.join(a.out, split, str(label))
            os.makedirs(folder, exist_ok=True)
            for i, pixels in enumerate(part):
                small = Image.frombytes("L", (8, 8), bytes(int(v * 255 / 16) for v in pixels))
                big = small.resize((a.size, a.size), Image.BILINEAR).convert("RGB")
                big.save(os.path.join(folder, f"{i:04d}.png"))
                n += 1
    print(f"wrote {n} images to {a.out}")


def train(a):
    import torch
    import torch.nn as nn
    from torch.utils.data import DataLoader
    from torchvision import datasets, models, transforms
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    tf_train = transforms.Compose([
        transforms.RandomResizedCrop(a.size, scale=(0.6, 1.0)), transforms.ToTensor(),
        transforms.Normalize(mean, std)])
    tf_eval = transforms.Compose([transforms.Resize(a.size), transforms.ToTensor(),
                                  transforms.Normalize(mean, std)])
    train_set = datasets.ImageFolder(f"{a.data}/train", tf_train)
    val_set = datasets.ImageFolder(f"{a.data}/val", tf_eval)
    loader = DataLoader(train_set, batch_size=64, shuffle=True, num_workers=0)
    model = models.resnet18(weights=None, num_classes=len(train_set.classes))
    sgd = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(sgd, a.epochs * len(loader))
    for epoch in range(a.epochs):
        model.train()
        for x, y in loader:
            loss = nn.functional.cross_entropy(model(x), y)
            sgd.zero_grad()
            loss.backward()
            sgd.step()
            schedule.step()
        print(f"epoch {epoch + 1}: loss {loss.item():.4f}", flush=True)
    model.eval()
    correct = 0
    with torch.no_grad():
        for x, y in DataLoader(val_set, batch_size=256):
            correct += (model(x).argmax(1) == y).sum().item()
    print(f"val top-1 {correct / len(val_set):.4f} ({len(val_set)} images)")
    torch.save(model.state_dict(), a.out)


def table(a):
    rows = []
    for path in a.runs:
        # runs/quality/RECIPE/seedN: each policy's rows are grouped per recipe.
        recipe = os.path.basename(os.path.dirname(os.path.normpath(path)))
        for r in csv.DictReader(open(os.path.join(path, "sweep.csv"))):
            if r["policy"] != "dense":
                r["policy"] = f"{r['policy']} ({recipe})"
            rows.append(dict(r, run=path))
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    cols = ("top1_compressed", "top1_recalibrated", "top1")
    print("| policy | conv MACs (of dense) | measured speedup | mean rel. error | top-1 compressed | "
          "top-1 BN recalibrated | top-1 after fine-tune | after − recalibrated (mean; worst seed) | "
          "per seed: recalibrated → after fine-tune (chosen epoch) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for p in policies:
        mine = [r for r in rows if r["policy"] == p]
        mean = lambda c: statistics.mean(float(r[c]) for r in mine)  # noqa: E731
        gains = [(float(r["top1"]) - float(r["top1_recalibrated"])) * 100 for r in mine]
        seeds = " / ".join(
            f"{float(r['top1_recalibrated']) * 100:.1f} → {float(r['top1']) * 100:.1f}"
            + (f" (e{r['chosen_epoch']})" if r.get("chosen_epoch") not in (None, "") else "")
            for r in mine)
        speed = (f"{mean('speedup'):.2f}× ({min(float(r['speedup']) for r in mine):.2f}–"
                 f"{max(float(r['speedup']) for r in mine):.2f})") if "speedup" in mine[0] else "-"
        print(f"| `{p}` | {mean('macs_ratio'):.3f} | {speed} | {mean('mean_rel_error'):.3f} | "
              + " | ".join(f"{mean(c) * 100:.1f} %" for c in cols)
              + f" | {statistics.mean(gains):+.2f}; {min(gains):+.2f} | {seeds} |")


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("prepare")
    q.add_argument("--out", required=True)
    q.add_argument("--size", type=int, default=64)
    q.add_argument("--held-out-share", type=float, default=0.05)
    q = sub.add_parser("train")
    q.add_argument("--data", required=True)
    q.add_argument("--out", required=True)
    q.add_argument("--size", type=int, default=64)
    q.add_argument("--epochs", type=int, default=8)
    q = sub.add_parser("table")
    q.add_argument("runs", nargs="+")
    a = p.parse_args()
    {"prepare": prepare, "train": train, "table": table}[a.cmd](a)


if __name__ == "__main__":
    main()
