"""PyTorch's model-only images/s for a tucker_nb model file, measured as `tucker-nb bench` measures
ours: the same model (rebuilt from the file's keys), batch, image size, device and thread count,
random resident data, warm-up excluded, one synchronisation per measurement, medians over repeats.
Modes: eval (no grad, eval-mode BN); train_all (forward, cross-entropy, backward, SGD step with
momentum 0.9 and weight decay 5e-4 over every parameter); train_seed (the same, over the
seed's trainable set: fc, plus the factorised convs of a compressed model); --modes picks some.
Prints one JSON line; with --serve, measures one call per request on stdin instead (tucker-nb bench
takes turns with it, so both sides' figures come from the same moments of a noisy machine)."""
import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from torch_resnet import load_state, resnet18_from_state, slot_names  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--precisions", default="fp32")
    p.add_argument("--modes", default="eval,train_all,train_seed")
    p.add_argument("--cudnn-benchmark", type=int, default=1)
    p.add_argument("--channels-last", type=int, default=0)
    p.add_argument("--serve", action="store_true")
    a = p.parse_args()
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    torch.backends.cudnn.benchmark = bool(a.cudnn_benchmark)
    device = torch.device(a.device)
    model = resnet18_from_state(load_state(a.model), a.model).to(device)
    if a.channels_last:  # the weights only, as tucker_nb: the first conv lays its output out NHWC
        model = model.to(memory_format=torch.channels_last)
    classes = model.fc.out_features
    torch.manual_seed(0)
    x = torch.randn(a.batch, 3, a.size, a.size, device=device)
    y = torch.randint(classes, (a.batch,), device=device)
    slots = slot_names(model)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def timed(f):
        t = time.perf_counter()
        f()
        sync()
        return a.batch * a.batches / (time.perf_counter() - t)

    def rate(f):
        f()  # warm-up: cuDNN autotuning, allocator, autocast caches
        sync()
        return statistics.median(timed(f) for _ in range(a.repeats))

    def params(mode):
        named = list(model.named_parameters())
        if mode == "train_seed":
            named = [(n, q) for n, q in named
                     if n.startswith("fc.") or any(n.startswith(s + ".") for s in slots)]
        return [q for _, q in named]

    def workload(precision, mode):
        """The call to time for one precision and mode (`model_batches` batches)."""
        cast = (torch.autocast("cuda", dtype=torch.bfloat16) if precision == "bf16"
                else torch.autocast("cuda", enabled=False))
        if mode == "eval":
            model.eval()

            def evaluate():
                with torch.no_grad(), cast:
                    for _ in range(a.batches):
                        model(x)
            return evaluate
        trainable = params(mode)
        for q in model.parameters():
            q.requires_grad_(False)
        for q in trainable:
            q.requires_grad_(True)
        sgd = torch.optim.SGD(trainable, lr=0.01, momentum=0.9, weight_decay=5e-4)
        model.train()

        def train():
            for _ in range(a.batches):
                with cast:
                    logits = model(x)
                loss = torch.nn.functional.cross_entropy(logits.float(), y)
                sgd.zero_grad()
                loss.backward()
                sgd.step()
        return train

    if a.serve:
        # One timed call per request line "PRECISION MODE", its images/s printed as one JSON line,
        # so the caller can take turns with its own measurements (the first call of a workload is
        # its warm-up; the caller discards it). An empty line or EOF ends.
        print(json.dumps({"threads": torch.get_num_threads()}), flush=True)
        current = None
        for line in sys.stdin:
            if not line.strip():
                break
            key = tuple(line.split())
            if key != current:
                current, f = key, workload(*key)
            print(json.dumps({"img_s": timed(f)}), flush=True)
        return

    results = []
    for precision in a.precisions.split(","):
        for mode in [m for m in ("eval", "train_all", "train_seed") if m in a.modes.split(",")]:
            results.append({"precision": precision, "mode": mode,
                            "img_s": rate(workload(precision, mode))})
    print(json.dumps({"threads": torch.get_num_threads(), "results": results}))


if __name__ == "__main__":
    main()
