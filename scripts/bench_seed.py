"""The seed's data pipeline (torchvision ImageFolder + DataLoader with its transforms), timed on the
same files as `tucker-nb bench`. Prints a JSON line of median images/s; called by
`tucker-nb bench --seed-python .venv/bin/python`, or by hand."""
import argparse
import json
import statistics
import time

import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def rate(repeats, n, f):
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        f()
        rates.append(n / (time.perf_counter() - t))
    return statistics.median(rates)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    torch.set_num_threads(1)  # workers do the work, as in the seed
    train_tf = transforms.Compose([
        transforms.RandomResizedCrop(a.size), transforms.RandomHorizontalFlip(),
        transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    eval_tf = transforms.Compose([
        transforms.Resize(a.size * 256 // 224), transforms.CenterCrop(a.size),
        transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    train = datasets.ImageFolder(f"{a.data}/train", transform=train_tf)
    evalset = datasets.ImageFolder(f"{a.data}/train", transform=eval_tf)
    n = len(train)

    def decode():
        for path, _ in train.samples:
            Image.open(path).convert("RGB").load()

    def epoch(ds, shuffle):
        loader = DataLoader(ds, batch_size=a.batch, shuffle=shuffle, num_workers=a.workers)
        for x, _ in loader:
            x.sum()

    print(json.dumps({
        "images": n,
        "decode": rate(a.repeats, n, decode),
        "train_loader": rate(a.repeats, n, lambda: epoch(train, True)),
        "eval_loader": rate(a.repeats, n, lambda: epoch(evalset, False)),
    }))


if __name__ == "__main__":
    main()
