"""The seed's compressor timed for `tucker-nb bench`: its TuckerCompressor (verbatim, from
tucker_nb/tests/oracle/seed_tucker.py) applied to every conv of a dense ResNet18 with the seed's
rule, ranks max(1, int(C * ratio)) per mode, in-process: the compression alone, as `bench` times
ours (loading and saving excluded). Serves one timed compression of a fresh copy per request line
on stdin, its seconds as one JSON line; an empty line or EOF ends."""
import argparse
import copy
import json
import os
import sys
import time

import torch

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, here)
sys.path.insert(0, os.path.join(here, "..", "tucker_nb", "tests", "oracle"))
from seed_tucker import TuckerCompressor  # noqa: E402
from torch_resnet import load_state, resnet18_from_state  # noqa: E402


def compress(model, ratio):
    compressor = TuckerCompressor()
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Conv2d):
                rank = (max(1, int(child.out_channels * ratio)),
                        max(1, int(child.in_channels * ratio)))
                setattr(module, name, compressor.compress_conv2d(child, rank))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True, help="a dense tucker_nb model file")
    p.add_argument("--ratio", type=float, default=0.2)
    p.add_argument("--threads", type=int, default=0)
    a = p.parse_args()
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    dense = resnet18_from_state(load_state(a.model), a.model)
    print(json.dumps({"threads": torch.get_num_threads()}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            break
        model = copy.deepcopy(dense)
        t = time.perf_counter()
        compress(model, a.ratio)
        print(json.dumps({"seconds": time.perf_counter() - t}), flush=True)


if __name__ == "__main__":
    main()
