"""`python -m experiments.plot RUN`: a run folder's loss and validation curves from its metrics.jsonl, as
RUN/curves.png (with matplotlib) and RUN/curves.csv; a missing folder or no metrics is a one-line error."""
import argparse
import sys
from pathlib import Path

from .common import read_jsonl
from .figures import run_curves


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("run", help="a train.py run folder (holds metrics.jsonl)")
    p.add_argument("--out", default=None, help="output stem: writes STEM.csv and STEM.png (default: RUN/curves)")
    a = p.parse_args(argv)
    run = Path(a.run)
    if not run.exists():
        sys.exit(f"error: {run} does not exist (give a train.py run folder)")
    if not run.is_dir():
        sys.exit(f"error: {run} is not a folder (give a train.py run folder)")
    if not read_jsonl(run / "metrics.jsonl"):
        sys.exit(f"error: {run} has no metrics.jsonl records (has train.py run there yet?)")
    stem = Path(a.out) if a.out else run / "curves"
    if stem.parent and not stem.parent.is_dir():
        sys.exit(f"error: --out {a.out}: folder {stem.parent} does not exist")
    res = run_curves(run, stem.with_suffix(".csv"), stem.with_suffix(".png"))
    print(f"wrote {res['csv']}" + (f" and {res['png']}" if res["png"] else " (matplotlib is not installed: no PNG)"))


if __name__ == "__main__":
    main()
