"""Runs notebooks on the "Rust (tucker_nb)" kernel headless (nbclient), for scripts/run-notebook,
scripts/setup (warm-up) and CI.

  notebook.py warm             compile the kernel's crates once into .evcxr/ (same :opt and :dep lines
                               as the notebook, so its first cell finds them built)
  notebook.py run OUT_DIR      execute notebooks/resnet18_tucker.ipynb; write the executed notebook and
                               the PNG charts under OUT_DIR; check the outputs; exit 1 on any failure
"""
import base64
import json
import os
import sys
import time

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(ROOT, "notebooks")
NOTEBOOK = os.path.join(NOTEBOOKS, "resnet18_tucker.ipynb")
KERNEL = "tucker_nb"


def execute(nb, timeout=None):
    client = NotebookClient(nb, kernel_name=KERNEL, timeout=timeout, startup_timeout=300,
                            resources={"metadata": {"path": NOTEBOOKS}})
    client.execute()
    return nb


def warm():
    """The notebook's own first cell, plus one call, so every crate it needs gets compiled."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    first = next(c for c in nb.cells if c.cell_type == "code")
    warmup = nbformat.v4.new_notebook()
    warmup.metadata = nb.metadata
    warmup.cells = [nbformat.v4.new_code_cell(first.source),
                    nbformat.v4.new_code_cell("tucker_nb::runtime::init();")]
    t = time.time()
    execute(warmup)
    print(f"[setup] kernel crates built in {time.time() - t:.0f} s")


def outputs(nb):
    for i, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []):
            yield i, out


def check(nb, out_dir):
    """Named checks of the executed notebook; returns (passed, failed) lists."""
    results = []
    errors = [(i, o) for i, o in outputs(nb) if o.output_type == "error"]
    results.append(("no error outputs", not errors,
                    "; ".join(f"cell {i}: {o.get('ename')}: {o.get('evalue', '')[:300]}" for i, o in errors)))
    html = [o["data"]["text/html"] for _, o in outputs(nb) if "data" in o and "text/html" in o["data"]]
    inline = [h for h in html if "data:image/png;base64," in h]
    inline += [o for _, o in outputs(nb) if "data" in o and "image/png" in o["data"]]
    results.append(("inline chart images", len(inline) >= 1, f"{len(inline)} found"))
    results.append(("HTML metrics table", any("train_loss" in h and "<table" in h for h in html), ""))
    results.append(("HTML layer report", any("rel. error" in h and "layer4.1.conv2" in h for h in html), ""))
    results.append(("HTML summary table", any("latency (batch 1)" in h for h in html), ""))
    results.append(("HTML sweep table", any("pareto" in h and "budget-macs:" in h for h in html), ""))
    results.append(("sweep with latency points, timed", any("budget-latency:" in h and "images_per_s" in h
                                                            and "predicted_speedup" in h for h in html), ""))
    results.append(("the seed's recipe beside the default in a summary",
                    any("seed&#x27;s recipe" in h or "seed's recipe" in h for h in html if "latency (batch 1)" in h), ""))
    results.append(("the compressed fine-tune's chosen epoch in its table",
                    any("chosen_epoch" in h and "held_out_top1" in h for h in html), ""))
    results.append(("multi-stage and folded rows in a summary",
                    any("multi-stage" in h and "BNs folded" in h and "latency (batch 1)" in h for h in html), ""))
    for name in ["accuracy.png", "loss.png", "accuracy-multistage.png", "pareto.png", "pareto-speed.png"]:
        path = os.path.join(out_dir, name)
        ok = os.path.isfile(path) and open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
        results.append((f"{name} is a PNG file", ok, path))
    for name in ["metrics.csv", "layers.csv", "layers-multistage.csv", "sweep.csv",
                 "multistage-folded.safetensors"]:
        results.append((f"{name} written", os.path.isfile(os.path.join(out_dir, name)), ""))
    passed = [r for r in results if r[1]]
    failed = [r for r in results if not r[1]]
    return passed, failed


def run(out_dir):
    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    os.environ["TUCKER_NB_OUT"] = out_dir
    nb = nbformat.read(NOTEBOOK, as_version=4)
    t = time.time()
    failure = None
    try:
        execute(nb)
    except CellExecutionError as e:
        failure = str(e).splitlines()[0] if str(e) else "cell failed"
    minutes = (time.time() - t) / 60
    target = os.path.join(out_dir, "resnet18_tucker.ipynb")
    nbformat.write(nb, target + ".tmp")
    os.replace(target + ".tmp", target)
    print(f"executed notebook: {target} ({minutes:.1f} min)")
    passed, failed = check(nb, out_dir)
    if failure:
        failed.insert(0, ("notebook ran to the end", False, failure))
    for name, ok, detail in passed + failed:
        print(f"{'ok  ' if ok else 'FAIL'} {name}{': ' + detail if detail and not ok else ''}")
    print(f"notebook: {len(passed)} passed, {len(failed)} failed")
    return 1 if failed else 0


def main():
    if len(sys.argv) >= 2 and sys.argv[1] == "warm":
        warm()
        return 0
    if len(sys.argv) == 3 and sys.argv[1] == "run":
        return run(sys.argv[2])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
