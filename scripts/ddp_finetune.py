"""Data-parallel fine-tuning of a tucker_nb model file on PyTorch DDP, with the seed's recipe.

Started as `scripts/ddp-finetune ARGS`: this file checks everything in one process (the model file
loads strictly into the seed's structure and runs, the data and the numbers are sound, the output
is free), then re-executes itself under torchrun with --nproc processes. Each process:

- rebuilds the model from the file's keys alone (scripts/torch_resnet.py: dense, Tucker-2
  three-layer and two-layer slots, folded BNs, any classifier size);
- trains the seed's set (`auto`: the factorised slots and fc when the file has any, else fc only),
  BN as `tucker-nb run --bn` says (stats: the seed's model.train() with BN affine fixed), with SGD
  (momentum, weight decay), StepLR and cross-entropy, or tucker_nb's distillation loss from
  --teacher;
- reads its shard of each epoch: DistributedSampler's shuffle (seeded by --seed and the epoch, the
  same on every rank), drop_last so the shards are disjoint, then batches of --batch-size per rank;
- augments like tucker_nb's loader (RandomResizedCrop + horizontal flip as one bilinear
  grid_sample per batch; ImageNet normalisation), each image's crop drawn from a generator seeded
  by (seed, epoch, image index), so what an image sees does not depend on the number of ranks;
  torch's own generator is seeded with seed + rank;
- evaluates before training and after every epoch on disjoint shards of the validation split with
  tucker_nb's eval transform (Resize(size·256/224) antialiased + CenterCrop), summing counts over
  ranks: the figures are those `tucker-nb evaluate` reports on the same file.

Rank 0 writes OUT/finetuned.safetensors (exactly the input's keys and dtypes), OUT/metrics.csv
(tucker_nb's metrics columns) and OUT/ddp.json (settings, world, evaluations), each staged and
renamed into place, so a failed run leaves earlier outputs as they were.

Gradients are averaged over ranks by DDP; BN statistics are per rank (each rank normalises over its
own batch of --batch-size, as the seed does on one GPU) unless --sync-bn (CUDA) makes them global."""
import argparse
import csv
import io
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from torch_resnet import load_state, resnet18_from_state, slot_names  # noqa: E402

IMG_EXTENSIONS = ("jpg", "jpeg", "png", "ppm", "bmp", "pgm", "tif", "tiff", "webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR_RECORD = 2 + 3 * 32 * 32
DEFAULT_MIXED_STORAGE = 256
METRICS_COLUMNS = ("phase", "epoch", "lr", "train_loss", "train_acc", "val_top1", "val_top5",
                   "val_loss", "seconds", "images_per_s", "warmup_seconds", "val_images_per_s",
                   "held_out_top1", "held_out_loss", "chosen_epoch")
OUTPUTS = ("finetuned.safetensors", "metrics.csv", "ddp.json")
# What the launcher hands the ranks: its arguments, the device kind, an ImageFolder's storage size.
ARGS_ENV = "TUCKER_NB_DDP_ARGS"
DEVICE_ENV, STORAGE_ENV = "TUCKER_NB_DDP_DEVICE", "TUCKER_NB_DDP_STORAGE"


class InputError(Exception):
    """Bad input, reported as one line naming the file or value, before any process starts."""


# --- arguments -------------------------------------------------------------------------------

def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="scripts/ddp-finetune",
        description="Fine-tune a tucker_nb model file on PyTorch DDP (torchrun): NCCL on CUDA, "
                    "gloo on CPU.")
    p.add_argument("--weights", required=True, type=Path,
                   help=".safetensors or .pth: dense, compressed or folded (tucker-nb's files)")
    p.add_argument("--data", required=True, type=Path,
                   help="ImageFolder root (train/, val/) or CIFAR-100 binary folder")
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--batch-size", type=int, default=64, help="per rank")
    p.add_argument("--eval-batch-size", type=int, default=256, help="per rank")
    p.add_argument("--nproc", type=int, default=1, help="processes (one per GPU on CUDA)")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--step-size", type=int, default=2)
    p.add_argument("--gamma", type=float, default=0.1)
    p.add_argument("--bn", choices=("frozen", "stats", "train"), default="stats",
                   help="BN while training, as tucker-nb run --bn (stats: the seed's)")
    p.add_argument("--trainable", choices=("auto", "classifier", "tucker", "all"), default="auto",
                   help="auto: factorised slots + fc when the file has any (the seed's compressed "
                        "fine-tune), else fc only (its original fine-tune)")
    p.add_argument("--distill", metavar="T,ALPHA",
                   help="distil from --teacher: loss α·CE + (1−α)·T²·KL, e.g. 4,0.5")
    p.add_argument("--teacher", type=Path, help="the model before compression (with --distill)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-batches", type=int, help="train on at most N batches per rank per epoch")
    p.add_argument("--train-limit", type=int, help="use only the first N training images")
    p.add_argument("--val-limit", type=int, help="use only the first N validation images")
    p.add_argument("--storage-size", type=int,
                   help="square size mixed-size images are decoded to (default 256)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: CUDA (NCCL) when available, else CPU (gloo)")
    p.add_argument("--workers", type=int, default=None,
                   help="decoding workers per rank for ImageFolder data (default: CPUs/nproc, ≤ 8)")
    p.add_argument("--sync-bn", action="store_true",
                   help="BN statistics over the global batch (SyncBatchNorm; CUDA only)")
    p.add_argument("--phase", help="name in metrics.csv (default: original or compressed)")
    p.add_argument("--record-shards", action="store_true",
                   help="write OUT/shards.json: the image indices each rank trained on per epoch")
    p.add_argument("--force", action="store_true", help="replace earlier outputs in --out")
    return p.parse_args(argv)


def check_numbers(args):
    """Refuses values that would train on nonsense, naming the flag (tucker_nb's rules)."""
    def need(ok, flag, value, rule):
        if not ok:
            raise InputError(f"--{flag} {value}: must be {rule}")
    need(1 <= args.image_size <= 4096, "image-size", args.image_size, "in 1..=4096")
    need(args.num_classes >= 1, "num-classes", args.num_classes, "≥ 1")
    need(args.epochs >= 1, "epochs", args.epochs, "≥ 1")
    need(math.isfinite(args.lr) and args.lr > 0, "lr", args.lr, "finite and > 0")
    need(0 <= args.momentum < 1, "momentum", args.momentum, "in [0, 1)")
    need(math.isfinite(args.weight_decay) and args.weight_decay >= 0, "weight-decay",
         args.weight_decay, "finite and ≥ 0")
    need(args.step_size >= 1, "step-size", args.step_size, "≥ 1")
    need(0 < args.gamma <= 1, "gamma", args.gamma, "in (0, 1]")
    for flag in ("batch_size", "eval_batch_size", "nproc", "max_batches", "train_limit",
                 "val_limit", "storage_size"):
        value = getattr(args, flag)
        if value is not None:
            need(value >= 1, flag.replace("_", "-"), value, "≥ 1")
    if args.storage_size is not None:
        need(args.storage_size <= 4096, "storage-size", args.storage_size, "in 1..=4096")
    if args.workers is not None:
        need(args.workers >= 0, "workers", args.workers, "≥ 0")
    if (args.distill is None) != (args.teacher is None):
        raise InputError("--distill and --teacher go together (the teacher is the model before "
                         "compression)")
    if args.distill is not None:
        args.distill = parse_distill(args.distill)


def parse_distill(spec):
    try:
        t, alpha = (float(v) for v in spec.split(","))
    except ValueError:
        raise InputError(f"--distill `{spec}`: expected T,ALPHA, as 4,0.5") from None
    if not (t > 0 and math.isfinite(t)):
        raise InputError(f"--distill temperature {t}: must be > 0")
    if not 0 <= alpha <= 1:
        raise InputError(f"--distill alpha {alpha}: must be in [0, 1]")
    return t, alpha


# --- the model -------------------------------------------------------------------------------

def load_model(path, num_classes, image_size):
    """The seed's structure rebuilt from `path`'s keys, checked to run, and the file's tensors."""
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    try:
        state = load_state(path)
    except Exception as e:  # a truncated or foreign file: say which
        raise InputError(f"{path}: not a readable model file ({type(e).__name__}: {e})") from None
    for name, t in state.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise InputError(f"{path}: tensor {name} has NaN or infinite values")
    try:
        model = resnet18_from_state(state, path)
    except ValueError as e:
        raise InputError(str(e)) from None
    classes = state["fc.weight"].shape[0]
    if classes != num_classes:
        raise InputError(f"{path}: its classifier has {classes} classes, --num-classes is "
                         f"{num_classes}")
    model.eval()
    with torch.no_grad():
        try:
            model(torch.zeros(1, 3, image_size, image_size))
        except RuntimeError as e:
            raise InputError(f"{path}: does not run at {image_size} px: {e}") from None
    return model, state


def trainable_names(model, trainable, bn):
    """State-dict names of the parameters `trainable` selects (tucker_nb's rule)."""
    slots = [f"{n}." for n in slot_names(model)]
    if trainable == "auto":
        trainable = "tucker" if slots else "classifier"
    names = []
    for name, _ in model.named_parameters():
        is_fc = name.startswith("fc.")
        is_bn = name.startswith("bn") or ".bn" in name or "downsample.1." in name
        selected = {"classifier": is_fc,
                    "tucker": is_fc or any(name.startswith(s) for s in slots),
                    "all": True}[trainable]
        if selected or (bn == "train" and is_bn):
            names.append(name)
    return names, trainable


def set_bn_mode(model, bn):
    """model.train(), with BN layers back in eval mode when frozen."""
    model.train()
    if bn == "frozen":
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def distillation_loss(student, teacher, labels, t, alpha):
    """α·CE(z_s, y) + (1 − α)·T²·KL(softmax(z_t/T) ‖ softmax(z_s/T)), as tucker_nb's."""
    ce = F.cross_entropy(student, labels)
    log_s = F.log_softmax(student / t, dim=-1)
    log_t = F.log_softmax(teacher / t, dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1).mean()
    return ce * alpha + kl * ((1 - alpha) * t * t)


# --- data ------------------------------------------------------------------------------------

def visible(name):
    return not name.startswith(".")


def scan_image_folder(root):
    """(classes, [(path, label)]) with torchvision's ImageFolder semantics, hidden entries skipped
    (as tucker_nb does)."""
    if not root.is_dir():
        raise InputError(f"{root}: no such folder")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and visible(e.name))
    if not classes:
        raise InputError(f"{root}: no class folders")
    samples = []
    for label, name in enumerate(classes):
        for dirpath, dirnames, files in sorted(os.walk(root / name, followlinks=True)):
            dirnames[:] = [d for d in dirnames if visible(d)]
            for f in sorted(files):
                if visible(f) and f.rsplit(".", 1)[-1].lower() in IMG_EXTENSIONS:
                    samples.append((os.path.join(dirpath, f), label))
    if not samples:
        raise InputError(f"{root}: no images")
    return classes, samples


class FolderImages(torch.utils.data.Dataset):
    """An ImageFolder split decoded on demand to uint8 3×S×S (tucker_nb's storage: the images' own
    size when they share one, else --storage-size, shorter side resized then centre-cropped)."""

    def __init__(self, root, storage_size):
        self.root = root
        self.classes, self.samples = scan_image_folder(root)
        self.labels = torch.tensor([label for _, label in self.samples])
        self.size = self._storage(storage_size)

    def _storage(self, storage_size):
        from PIL import Image
        if storage_size is not None:
            return (storage_size, storage_size)
        known = os.environ.get(STORAGE_ENV)
        if known:  # found by the launcher's check: the ranks need not open every file again
            w, h = known.split("x")
            return (int(w), int(h))
        sizes = set()
        for path, _ in self.samples:
            try:
                with Image.open(path) as img:
                    sizes.add(img.size)
            except Exception as e:
                raise InputError(f"{path}: not a readable image ({e})") from None
            if len(sizes) > 1:
                return (DEFAULT_MIXED_STORAGE, DEFAULT_MIXED_STORAGE)
        return sizes.pop()

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        from PIL import Image
        path, label = self.samples[i]
        with Image.open(path) as img:
            img = img.convert("RGB")
        w, h = self.size
        if img.size != (w, h):
            iw, ih = img.size
            scale = max(w / iw, h / ih)
            rw, rh = max(round(iw * scale), w), max(round(ih * scale), h)
            img = img.resize((rw, rh), Image.BILINEAR)
            left, top = (rw - w) // 2, (rh - h) // 2
            img = img.crop((left, top, left + w, top + h))
        pixels = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())
        return pixels.permute(2, 0, 1).contiguous(), label


class TensorImages:
    """Images already in memory (CIFAR-100 binary): uint8 N×3×H×W and int64 labels."""

    def __init__(self, images, labels, classes):
        self.images, self.labels, self.classes = images, labels, classes

    def __len__(self):
        return len(self.labels)


def read_cifar100(path):
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    data = path.read_bytes()
    if not data or len(data) % CIFAR_RECORD:
        raise InputError(f"{path}: {len(data)} bytes is not a whole number of CIFAR-100 records "
                         f"({CIFAR_RECORD} bytes each)")
    records = np.frombuffer(data, dtype=np.uint8).reshape(-1, CIFAR_RECORD)
    labels = torch.from_numpy(records[:, 1].astype(np.int64))
    images = torch.from_numpy(records[:, 2:].copy()).view(-1, 3, 32, 32)
    names_file = path.parent / "fine_label_names.txt"
    if names_file.is_file():
        classes = [n.strip() for n in names_file.read_text().splitlines() if n.strip()]
    else:
        classes = [str(i) for i in range(100)]
    if int(labels.max()) >= len(classes):
        raise InputError(f"{path}: label {int(labels.max())} but {len(classes)} classes")
    return TensorImages(images, labels, classes)


def load_split(root, split, storage_size):
    """The train or val split of an ImageFolder root or CIFAR-100 binary folder."""
    if (root / "train").is_dir() and (root / "val").is_dir():
        return FolderImages(root / split, storage_size)
    for folder in (root, root / "cifar-100-binary"):
        if (folder / "train.bin").is_file() and (folder / "test.bin").is_file():
            return read_cifar100(folder / ("train.bin" if split == "train" else "test.bin"))
    raise InputError(f"{root}: neither an ImageFolder root (train/ and val/) nor a CIFAR-100 "
                     "binary folder (train.bin, test.bin)")


def limited(indices, limit):
    return indices if limit is None else indices[:limit]


def load_data(args):
    train = load_split(args.data, "train", args.storage_size)
    val = load_split(args.data, "val", args.storage_size)
    if train.classes != val.classes:
        raise InputError(f"{args.data}: train and val class lists differ")
    if len(train.classes) > args.num_classes:
        raise InputError(f"{args.data}: {len(train.classes)} classes, more than --num-classes "
                         f"{args.num_classes}")
    return train, val


class Batches:
    """uint8 images and labels of the given index batches: gathered from memory, or decoded by
    DataLoader workers."""

    def __init__(self, dataset, workers):
        self.dataset, self.workers = dataset, workers

    def __call__(self, index_batches):
        if isinstance(self.dataset, TensorImages):
            for idx in index_batches:
                t = torch.tensor(idx)
                yield self.dataset.images[t], self.dataset.labels[t]
            return
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=index_batches, num_workers=self.workers,
            persistent_workers=False)
        yield from loader


# --- transforms (tucker_nb's loader, batched on the device) ----------------------------------

def crop_params(height, width, rng):
    """torchvision's RandomResizedCrop.get_params: (top, left, h, w)."""
    area = height * width
    log_lo, log_hi = math.log(3 / 4), math.log(4 / 3)
    for _ in range(10):
        target = area * rng.uniform(0.08, 1.0)
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    ratio = width / height
    if ratio < 3 / 4:
        w, h = width, round(width / (3 / 4))
    elif ratio > 4 / 3:
        w, h = round(height * (4 / 3)), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def crop_thetas(indices, height, width, seed, epoch):
    """Each image's crop + flip as the 2×3 affine matrix affine_grid takes, drawn from a generator
    seeded by (seed, epoch, index): the same whatever rank or batch the image lands in."""
    theta = []
    for i in indices:
        rng = random.Random(f"{seed}/{epoch}/{i}")
        top, left, h, w = crop_params(height, width, rng)
        flip = -1.0 if rng.random() < 0.5 else 1.0
        sx, sy = w / width, h / height
        tx, ty = (2 * left + w) / width - 1, (2 * top + h) / height - 1
        theta.append([[sx * flip, 0.0, tx], [0.0, sy, ty]])
    return torch.tensor(theta, dtype=torch.float32)


def normalize(x):
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x / 255.0 - mean) / std


def train_transform(images, theta, size):
    grid = F.affine_grid(theta.to(images.device), [images.shape[0], 3, size, size],
                         align_corners=False)
    x = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border",
                      align_corners=False)
    return normalize(x)


def eval_transform(images, size):
    """Resize(⌊size·256/224⌋, shorter side; antialiased when shrinking) + CenterCrop(size)."""
    _, _, height, width = images.shape
    resize = size * 256 // 224
    h, w = ((resize, resize * width // height) if height <= width
            else (resize * height // width, resize))
    x = images.float()
    if (h, w) != (height, width):
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False,
                          antialias=h < height or w < width)
    top, left = round((h - size) / 2), round((w - size) / 2)
    return normalize(x[:, :, top:top + size, left:left + size])


# --- distributed -----------------------------------------------------------------------------

def shard(n, world, rank, seed, epoch):
    """This rank's images of an epoch: DistributedSampler's shuffle with drop_last, so the ranks'
    shards are disjoint and equally long."""
    sampler = torch.utils.data.DistributedSampler(
        range(n), num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
    sampler.set_epoch(epoch)
    return list(sampler)


def summed(values, device):
    """Element-wise sums over the ranks, in float64, of numbers or 0-d tensors (read back here,
    the one device sync)."""
    t = torch.stack([torch.as_tensor(v, device=device).to(torch.float64) for v in values])
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def evaluate(model, batches, n, size, rank, world, batch_size, device):
    """(top1, top5, loss, images) over every validation image, each counted once."""
    mine = list(range(rank, n, world))
    index_batches = [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]
    model.eval()
    start = time.perf_counter()
    # Summed on the device, read back once.
    top1, top5, loss = (torch.zeros((), dtype=torch.float64, device=device) for _ in range(3))
    with torch.no_grad():
        for images, labels in batches(index_batches):
            images, labels = images.to(device, non_blocking=True), labels.to(device)
            logits = model(eval_transform(images, size)).float()
            loss += F.cross_entropy(logits, labels, reduction="sum").double()
            best = logits.topk(min(5, logits.shape[1]), 1).indices
            hits = best.eq(labels.unsqueeze(1))
            top1 += hits[:, 0].sum()
            top5 += hits.any(1).sum()
    top1, top5, loss, seen = summed([top1, top5, loss, len(mine)], device)
    return {"top1": top1 / n, "top5": top5 / n, "loss": loss / n, "correct": int(top1),
            "images": int(seen), "images_per_s": seen / (time.perf_counter() - start)}


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- outputs ---------------------------------------------------------------------------------

class Staged:
    """Outputs written as hidden temporaries beside their final names, fsynced, and renamed into
    place together by commit(); dropped on failure, so earlier outputs stay as they were."""

    def __init__(self, folder):
        self.folder, self.staged = folder, []

    def path(self, name):
        tmp = self.folder / f".{name}.tmp-{os.getpid()}"
        self.staged.append((tmp, self.folder / name))
        return tmp

    def write_bytes(self, name, data):
        tmp = self.path(name)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    def commit(self):
        for tmp, final in self.staged:
            os.replace(tmp, final)
        fd = os.open(self.folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        self.staged = []

    def discard(self):
        for tmp, _ in self.staged:
            tmp.unlink(missing_ok=True)
        self.staged = []


def metrics_csv(rows):
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(METRICS_COLUMNS)
    # No held-out selection here (the seed's fine-tune): held-out figures empty, and the model
    # written is the last epoch's.
    last = rows[-1]["epoch"] if rows else 0
    for row in rows:
        row = dict(row, held_out_top1="", held_out_loss="", chosen_epoch=last)
        writer.writerow([row[c] for c in METRICS_COLUMNS])
    return out.getvalue().encode()


def save_outputs(args, model, state, rows, report, shards):
    from safetensors.torch import save
    trained = model.state_dict()
    tensors = {k: trained[k].detach().to("cpu", v.dtype).contiguous() for k, v in state.items()}
    staged = Staged(args.out)
    try:
        staged.write_bytes("finetuned.safetensors", save(tensors))
        staged.write_bytes("metrics.csv", metrics_csv(rows))
        staged.write_bytes("ddp.json", (json.dumps(report, indent=2) + "\n").encode())
        if shards is not None:
            staged.write_bytes("shards.json", json.dumps(shards).encode())
        staged.commit()
    finally:
        staged.discard()


def check_out(args):
    if args.out.exists() and not args.out.is_dir():
        raise InputError(f"{args.out}: exists and is not a folder")
    earlier = [n for n in OUTPUTS if (args.out / n).exists()]
    if earlier and not args.force:
        raise InputError(f"{args.out}: already holds {', '.join(earlier)} (--force replaces them)")


# --- the run ---------------------------------------------------------------------------------

def check(args):
    """Everything that can be refused before a process starts; returns the device kind."""
    check_numbers(args)
    want_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if want_cuda:
        if not torch.cuda.is_available():
            raise InputError("--device cuda: no CUDA device is visible")
        if args.nproc > torch.cuda.device_count():
            raise InputError(f"--nproc {args.nproc}: only {torch.cuda.device_count()} CUDA "
                             "devices are visible")
    elif args.sync_bn:
        raise InputError("--sync-bn: SyncBatchNorm needs CUDA (NCCL)")
    load_model(args.weights, args.num_classes, args.image_size)
    if args.teacher is not None:
        load_model(args.teacher, args.num_classes, args.image_size)
    train, _ = load_data(args)
    per_rank = len(limited(range(len(train)), args.train_limit)) // args.nproc
    if per_rank == 0:
        raise InputError(f"{args.data}: {len(train)} training images cannot be shared by "
                         f"{args.nproc} processes")
    check_out(args)
    storage = train.size if isinstance(train, FolderImages) else None
    return ("cuda" if want_cuda else "cpu"), storage


def run(args):
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", 0))
    kind = os.environ[DEVICE_ENV]
    if kind == "cuda":
        torch.cuda.set_device(local)
        device, backend = torch.device("cuda", local), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend)
    try:
        train_and_save(args, rank, world, device, backend)
    finally:
        dist.destroy_process_group()


def train_and_save(args, rank, world, device, backend):
    torch.manual_seed(args.seed + rank)
    model, state = load_model(args.weights, args.num_classes, args.image_size)
    names, trainable = trainable_names(model, args.trainable, args.bn)
    for name, p in model.named_parameters():
        p.requires_grad_(name in names)
    if args.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device)
    teacher = None
    if args.teacher is not None:
        teacher = load_model(args.teacher, args.num_classes, args.image_size)[0].to(device).eval()
    train, val = load_data(args)
    workers = args.workers
    if workers is None:
        workers = min(8, (os.cpu_count() or 1) // world) if isinstance(train, FolderImages) else 0
    train_batches, val_batches = Batches(train, workers), Batches(val, workers)
    n_train = len(limited(range(len(train)), args.train_limit))
    n_val = len(limited(range(len(val)), args.val_limit))
    height, width = (train.size[1], train.size[0]) if isinstance(train, FolderImages) else (32, 32)
    ddp = nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, args.step_size, args.gamma)
    phase = args.phase or ("compressed" if slot_names(model) else "original")

    def evaluation():
        # Under DDP each rank's running statistics drift from rank 0's after its last batch:
        # every rank evaluates rank 0's, the model that is saved.
        for buffer in model.buffers():
            dist.broadcast(buffer, 0)
        return evaluate(model, val_batches, n_val, args.image_size, rank, world,
                        args.eval_batch_size, device)

    before = evaluation()
    if rank == 0:
        print(f"[ddp] {world} × {backend} on {device.type}: {phase}, trains {trainable} "
              f"({len(names)} tensors); before: top-1 {before['top1']:.4f}", flush=True)
    rows, shards = [], ([] if args.record_shards else None)
    for epoch in range(args.epochs):
        start = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        mine = shard(n_train, world, rank, args.seed, epoch)
        index_batches = [mine[i:i + args.batch_size] for i in range(0, len(mine), args.batch_size)]
        index_batches = index_batches[:args.max_batches]
        if shards is not None:
            seen = [None] * world
            dist.all_gather_object(seen, [i for b in index_batches for i in b])
            shards.append(seen)
        set_bn_mode(ddp, args.bn)
        # Summed on the device and read back every 10 batches, as tucker_nb's loop.
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        seen_images, last = 0, len(index_batches) - 1
        # The steady part, as tucker_nb's: after the first batch, before a smaller last one.
        steady_from = steady = None
        for b, (images, labels) in enumerate(train_batches(index_batches)):
            if b == last and len(labels) < args.batch_size and steady_from and not steady:
                synchronize(device)
                steady = (time.perf_counter() - steady_from[0], seen_images - steady_from[1])
            theta = crop_thetas(index_batches[b], height, width, args.seed, epoch)
            images = train_transform(images.to(device, non_blocking=True), theta, args.image_size)
            labels = labels.to(device)
            logits = ddp(images)
            if teacher is not None:
                with torch.no_grad():
                    taught = teacher(images)
                loss = distillation_loss(logits, taught, labels, *args.distill)
            else:
                loss = F.cross_entropy(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach().double() * len(labels)
            correct += (logits.argmax(1) == labels).sum()
            seen_images += len(labels)
            if b % 10 == 9 or b == last:
                total_loss, total_seen = summed([loss_sum, seen_images], device)
                if not math.isfinite(total_loss):
                    raise RuntimeError(f"loss {total_loss / total_seen} in {phase} epoch "
                                       f"{epoch + 1} by batch {b + 1}: training stopped, nothing "
                                       "written")
            if b == 0 and last > 0:
                synchronize(device)
                steady_from = (time.perf_counter(), seen_images)
        if steady_from and not steady:
            synchronize(device)
            steady = (time.perf_counter() - steady_from[0], seen_images - steady_from[1])
        scheduler.step()
        loss_sum, correct, seen_images = summed([loss_sum, correct, seen_images], device)
        train_seconds = time.perf_counter() - start
        after = evaluation()
        seconds = time.perf_counter() - start
        # Per rank: each trains its shard in the same time, so the world's rate is world × it.
        if steady and steady[1] > 0:
            rate, warmup = world * steady[1] / steady[0], train_seconds - steady[0]
        else:
            rate, warmup = seen_images / train_seconds, train_seconds
        rows.append({"phase": phase, "epoch": epoch + 1, "lr": lr,
                     "train_loss": loss_sum / seen_images, "train_acc": correct / seen_images,
                     "val_top1": after["top1"], "val_top5": after["top5"],
                     "val_loss": after["loss"], "seconds": seconds,
                     "images_per_s": rate, "warmup_seconds": warmup,
                     "val_images_per_s": after["images_per_s"]})
        if rank == 0:
            r = rows[-1]
            print(f"[ddp] epoch {epoch + 1}/{args.epochs}: loss {r['train_loss']:.4f}, "
                  f"top-1 {r['val_top1']:.4f}, {r['images_per_s']:.1f} images/s", flush=True)
    if rank == 0:
        report = {"weights": str(args.weights), "data": str(args.data), "world_size": world,
                  "backend": backend, "device": device.type, "phase": phase,
                  "trainable": trainable, "bn": args.bn, "sync_bn": args.sync_bn,
                  "batch_size_per_rank": args.batch_size, "global_batch": args.batch_size * world,
                  "epochs": args.epochs, "lr": args.lr, "seed": args.seed,
                  "distill": args.distill, "teacher": args.teacher and str(args.teacher),
                  "train_images": n_train, "val_images": n_val,
                  "before": before, "after": after}
        save_outputs(args, model, state, rows, report, shards)
        print(f"[ddp] wrote {args.out / 'finetuned.safetensors'}: top-1 {before['top1']:.4f} → "
              f"{after['top1']:.4f} ({after['correct']}/{after['images']})", flush=True)
    dist.barrier()


def launch(args, argv):
    """Checks in this process, then re-executes this file under torchrun."""
    kind, storage = check(args)
    args.out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, **{DEVICE_ENV: kind})
    if storage is not None:
        env[STORAGE_ENV] = f"{storage[0]}x{storage[1]}"
    if kind == "cpu" and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.nproc))
    # The ranks get the arguments through the environment: torchrun's own parser would claim
    # flags such as --nproc.
    env[ARGS_ENV] = json.dumps(argv)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={args.nproc}", str(Path(__file__).resolve())]
    os.execve(sys.executable, command, env)


def main(argv):
    if "RANK" in os.environ and ARGS_ENV in os.environ:
        args = parse_args(json.loads(os.environ[ARGS_ENV]))
        check_numbers(args)
        run(args)
        return 0
    args = parse_args(argv)
    try:
        launch(args, argv)
    except InputError as e:
        print(f"ddp-finetune: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
