"""Runs notebooks on the "Rust (tucker_nb)" kernel headless (nbclient), for scripts/run-notebook,
scripts/setup (warm-up) and CI.

  notebook.py warm             compile the kernel's crates once into .evcxr/ (the kernel loads
                               notebooks/evcxr.toml's dependencies at the notebook's optimisation
                               level as it starts; then the notebook's first cell and one call)
  notebook.py run OUT_DIR      execute notebooks/resnet18_tucker.ipynb; write the executed notebook and
                               the PNG charts under OUT_DIR; check the outputs; exit 1 on any failure
  notebook.py timing OUT_DIR   execute it cell by cell on one kernel: print the kernel's start, each
                               code cell's seconds, then a trivial cell's and the original model's
                               evaluation cell's seconds when run again
"""
import base64
import json
import os
import re
import sys
import time

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(ROOT, "notebooks")
NOTEBOOK = os.path.join(NOTEBOOKS, "resnet18_tucker.ipynb")
KERNEL = "tucker_nb"


# The kernel builds notebooks/evcxr.toml's dependencies as it starts: minutes the first time (the
# warm-up), seconds after, unless the crate changed.
STARTUP_TIMEOUT = 3600


def client_for(nb):
    return NotebookClient(nb, kernel_name=KERNEL, timeout=None, startup_timeout=STARTUP_TIMEOUT,
                          resources={"metadata": {"path": NOTEBOOKS}})


def execute(nb):
    try:
        client_for(nb).execute()
    finally:
        number_outputs_as_cells(nb)
    return nb


def number_outputs_as_cells(nb):
    """nbclient numbers the cells it runs from 1; evcxr_jupyter 0.22 numbers its results from 2 (it
    counts before its first reply), so every saved [n]: was answered by [n+1]:. The saved notebook
    gives each result its cell's number."""
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if "execution_count" in out and cell.get("execution_count") is not None:
                out["execution_count"] = cell.execution_count


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
    mismatched = [i for i, cell in enumerate(nb.cells) for o in cell.get("outputs", [])
                  if "execution_count" in o and o["execution_count"] != cell.get("execution_count")]
    results.append(("each result numbered as its cell", not mismatched, f"cells {mismatched}"))
    results.append(("HTML metrics table", any("train loss" in h and "<table" in h for h in html), ""))
    results.append(("HTML layer report", any("rel. error" in h and "layer4.1.conv2" in h for h in html), ""))
    results.append(("HTML summary table", any("latency (batch 1)" in h for h in html), ""))
    results.append(("HTML sweep table", any("on the front" in h and "budget-macs:" in h for h in html), ""))
    sweep_csv = os.path.join(out_dir, "sweep.csv")
    sweep_header = open(sweep_csv).readline() if os.path.isfile(sweep_csv) else ""
    results.append(("sweep with latency points, timed",
                    any("budget-latency:" in h and "speedup" in h for h in html)
                    and "images_per_s" in sweep_header and "predicted_speedup" in sweep_header, ""))
    results.append(("the seed's recipe beside the default in a summary",
                    any("seed&#x27;s recipe" in h or "seed's recipe" in h for h in html if "latency (batch 1)" in h), ""))
    results.append(("the compressed fine-tune's chosen epoch in its table",
                    any("chosen epoch" in h and "held-out top-1" in h for h in html), ""))
    results.append(("a CP row beside Tucker-2 in a summary",
                    any("cp:0." in h and "BN recalibrated" in h and "latency (batch 1)" in h for h in html), ""))
    results.append(("multi-stage and folded rows in a summary",
                    any("multi-stage" in h and "BNs folded" in h and "latency (batch 1)" in h for h in html), ""))
    if os.environ.get("TUCKER_NB_PROFILE") == "smoke":
        results.append(smoke_story(os.path.join(out_dir, "summary.html")))
    for name in ["accuracy.png", "loss.png", "accuracy-multistage.png", "pareto.png", "pareto-speed.png"]:
        path = os.path.join(out_dir, name)
        ok = os.path.isfile(path) and open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
        results.append((f"{name} is a PNG file", ok, path))
    for name in ["metrics.csv", "layers.csv", "layers-multistage.csv", "layers-cp.csv", "sweep.csv",
                 "multistage-folded.safetensors"]:
        results.append((f"{name} written", os.path.isfile(os.path.join(out_dir, name)), ""))
    passed = [r for r in results if r[1]]
    failed = [r for r in results if not r[1]]
    return passed, failed


def summary_top1(path):
    """{model: top-1 in %} of the notebook's summary table (summary.html)."""
    html = open(path).read() if os.path.isfile(path) else ""
    cells = r'<td[^>]*>([^<]*)</td><td[^>]*>([0-9.]+) %</td>'
    return {name: float(top1) for name, top1 in re.findall(cells, html)}


SMOKE_CLASSES = 10


def smoke_story(path):
    """The smoke profile tells a real run's story (issue 22): the compressed model's fine-tune ends
    at or above its BN-recalibrated start, and at least 3x chance."""
    top1 = summary_top1(path)
    start, end = top1.get("compressed, BN recalibrated"), top1.get("compressed + fine-tuned")
    ok = start is not None and end is not None and end >= start and end >= 300 / SMOKE_CLASSES
    return ("the smoke fine-tune ends at or above its recalibrated start, 3x chance or more", ok,
            f"recalibrated {start} %, fine-tuned {end} % (chance {100 / SMOKE_CLASSES:.0f} %)")


# A cell ending in a plain Debug value, run after the notebook (and left out of the saved copy): the
# kernel's prelude shows it through tucker_nb's ShowDebug, in one build.
DEBUG_PROBE = ("(1 + 1, \"two\")", "(2, \"two\")")


def plain_text(cell):
    return "".join(o["data"]["text/plain"] for o in cell.get("outputs", [])
                   if "data" in o and "text/plain" in o["data"]).strip()


def run(out_dir):
    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    os.environ["TUCKER_NB_OUT"] = out_dir
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(DEBUG_PROBE[0]))
    t = time.time()
    failure = None
    try:
        execute(nb)
    except CellExecutionError as e:
        failure = str(e).splitlines()[0] if str(e) else "cell failed"
    probe = nb.cells.pop()
    minutes = (time.time() - t) / 60
    target = os.path.join(out_dir, "resnet18_tucker.ipynb")
    nbformat.write(nb, target + ".tmp")
    os.replace(target + ".tmp", target)
    print(f"executed notebook: {target} ({minutes:.1f} min)")
    passed, failed = check(nb, out_dir)
    shown = plain_text(probe)
    (passed if shown == DEBUG_PROBE[1] else failed).append(
        ("a Debug value shown as text", shown == DEBUG_PROBE[1], f"{DEBUG_PROBE[0]} showed {shown!r}"))
    if failure:
        failed.insert(0, ("notebook ran to the end", False, failure))
    for name, ok, detail in passed + failed:
        print(f"{'ok  ' if ok else 'FAIL'} {name}{': ' + detail if detail and not ok else ''}")
    print(f"notebook: {len(passed)} passed, {len(failed)} failed")
    return 1 if failed else 0


def first_line(source):
    line = next((l for l in source.splitlines() if l.strip()), "")
    return line if len(line) <= 70 else line[:67] + "..."


# How often notebook-timing runs the trivial cell again; it reports the median.
TRIVIAL_RUNS = 5


def timing(out_dir):
    """Seconds of the kernel's start and of each code cell, then of a trivial cell and of a real one
    run again, as a user re-running cells sees them."""
    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    os.environ["TUCKER_NB_OUT"] = out_dir
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = client_for(nb)
    rows = []

    def timed(cell, index):
        t = time.time()
        client.execute_cell(cell, index, store_history=True)
        return time.time() - t

    start = time.time()
    with client.setup_kernel():
        rows.append(("kernel start", "(evcxr.toml's dependencies and prelude)", time.time() - start))
        total = 0.0
        for i, cell in enumerate(nb.cells):
            if cell.cell_type != "code":
                continue
            seconds = timed(cell, i)
            total += seconds
            rows.append((f"cell {i}", first_line(cell.source), seconds))
        rows.append(("all code cells", "", total))
        trivial = nbformat.v4.new_code_cell("1 + 1")
        nb.cells.append(trivial)
        timed(trivial, len(nb.cells) - 1)  # its first run compiles the cell
        again_seconds = sorted(timed(trivial, len(nb.cells) - 1) for _ in range(TRIVIAL_RUNS))
        rows.append(("trivial, again", f"1 + 1 (median of {TRIVIAL_RUNS})",
                     again_seconds[TRIVIAL_RUNS // 2]))
        trivial_shown = plain_text(trivial)
        again = next(i for i, c in enumerate(nb.cells)
                     if c.cell_type == "code" and "original_eval" in c.source)
        rows.append((f"cell {again}, again", first_line(nb.cells[again].source),
                     timed(nb.cells[again], again)))
    for what, source, seconds in rows:
        print(f"{what:<18} {seconds:8.1f} s  {source}")
    number_outputs_as_cells(nb)
    target = os.path.join(out_dir, "resnet18_tucker.ipynb")
    nbformat.write(nb, target + ".tmp")
    os.replace(target + ".tmp", target)
    errors = [(i, o) for i, o in outputs(nb) if o.output_type == "error"]
    for i, o in errors:
        print(f"FAIL cell {i}: {o.get('ename')}: {o.get('evalue', '')[:300]}")
    if trivial_shown != "2":
        print(f"FAIL the trivial cell showed {trivial_shown!r}, not '2'")
    return 1 if errors or trivial_shown != "2" else 0


def main():
    if len(sys.argv) >= 2 and sys.argv[1] == "warm":
        warm()
        return 0
    if len(sys.argv) == 3 and sys.argv[1] == "run":
        return run(sys.argv[2])
    if len(sys.argv) == 3 and sys.argv[1] == "timing":
        return timing(sys.argv[2])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
