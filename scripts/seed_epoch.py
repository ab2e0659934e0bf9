"""One epoch of the seed's own pipeline (its get_dataloader, model and fine_tune loop: ImageFolder +
DataLoader with 4 workers, fc trained), timed. Prints a JSON line with images/s; used by
scripts/gpu-check to compare against tucker-nb on the same data and GPU."""
import argparse
import json
import time

import torch
import torch.nn as nn
from torch.utils.data import DataLoader
from torchvision import datasets, models, transforms

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--max-batches", type=int, default=0, help="stop after N batches (0: whole epoch)")
    a = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tf = transforms.Compose([transforms.RandomResizedCrop(a.size), transforms.RandomHorizontalFlip(),
                             transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    train = datasets.ImageFolder(f"{a.data}/train", transform=tf)
    loader = DataLoader(train, batch_size=a.batch, shuffle=True, num_workers=a.workers)
    model = models.resnet18(weights=None)
    model.fc = nn.Linear(model.fc.in_features, len(train.classes))
    model = model.to(device)
    for q in model.parameters():
        q.requires_grad = False
    for q in model.fc.parameters():
        q.requires_grad = True
    opt = torch.optim.SGD(filter(lambda q: q.requires_grad, model.parameters()), lr=0.01, momentum=0.9,
                          weight_decay=5e-4)
    crit = nn.CrossEntropyLoss()
    model.train()
    seen, t = 0, time.perf_counter()
    for i, (x, y) in enumerate(loader):
        x, y = x.to(device), y.to(device)
        opt.zero_grad()
        crit(model(x), y).backward()
        opt.step()
        seen += y.size(0)
        if a.max_batches and i + 1 >= a.max_batches:
            break
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t
    print(json.dumps({"pipeline": "seed", "device": str(device), "images": seen, "seconds": dt,
                      "images_per_s": seen / dt}))


if __name__ == "__main__":
    main()
