"""Does libtorch's CPU strided 1×1 conv still crash? (the reason for `Conv2d::subsampled_pointwise`)

PyTorch 2.11's oneDNN 3.10.2 corrupts the heap (then SIGSEGV) in the backward pass of a 1×1,
stride-2 conv on channels-last inputs with 8–13 input channels, an odd batch of 25 or more and 2+
threads: the shape of a Tucker-2 downsample at ratio 0.2 on an epoch's smaller last batch. This
runs each configuration in a child process, libtorch's conv and ours (sample every stride-th pixel,
then a stride-1 1×1), and prints a table: exit status, and the largest gradient error against a
float64 reference. Run it after a libtorch upgrade; when the `torch` column is all 0 the
workaround can go.

  .venv/bin/python scripts/onednn_strided_1x1.py
"""
import subprocess
import sys

import torch
import torch.nn.functional as F

CASES = [  # batch, input channels, output channels, side
    (25, 12, 25, 16), (29, 12, 25, 16), (25, 8, 51, 16), (33, 13, 12, 16), (25, 12, 25, 32),
    (64, 12, 25, 16), (25, 16, 32, 16),
]


def child(mb, ci, co, side, ours):
    torch.set_num_threads(2)
    torch.manual_seed(0)
    cl = torch.channels_last
    x = torch.randn(mb, ci, side, side).contiguous(memory_format=cl).requires_grad_()
    w = torch.randn(co, ci, 1, 1).contiguous(memory_format=cl).requires_grad_()
    y = F.conv2d(x[:, :, ::2, ::2], w) if ours else F.conv2d(x, w, stride=2)
    g = torch.randn_like(y)
    y.backward(g)
    xd = x.detach().double().requires_grad_()
    wd = w.detach().double().requires_grad_()
    F.conv2d(xd, wd, stride=2).backward(g.double())
    rel = lambda a, b: ((a.double() - b).abs().max() / b.abs().max()).item()  # noqa: E731
    print(f"{max(rel(x.grad, xd.grad), rel(w.grad, wd.grad)):.1e}")


def main():
    if len(sys.argv) == 7 and sys.argv[1] == "child":
        child(*map(int, sys.argv[2:6]), sys.argv[6] == "ours")
        return
    onednn = [line.strip() for line in torch.__config__.show().splitlines() if "MKL-DNN" in line]
    print(f"torch {torch.__version__}; {onednn[0] if onednn else 'no oneDNN'}; 2 threads")
    print("| batch | C_in | C_out | side | torch: exit, grad error | sample first: exit, grad error |")
    print("|---|---|---|---|---|---|")
    crashed = False
    for case in CASES:
        cells = []
        for how in ("torch", "ours"):
            r = subprocess.run([sys.executable, __file__, "child", *map(str, case), how],
                               capture_output=True, text=True)
            cells.append(f"{r.returncode}, {r.stdout.strip() or '-'}")
            crashed |= how == "ours" and r.returncode != 0
        print("| " + " | ".join(map(str, case)) + " | " + " | ".join(cells) + " |")
    sys.exit(1 if crashed else 0)


if __name__ == "__main__":
    main()
