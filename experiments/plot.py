"""`python -m experiments.plot RUN`: a run folder's loss and validation curves from its metrics.jsonl, as
RUN/curves.png (with matplotlib) and RUN/curves.csv. A missing folder, a damaged metrics line (named by line
and field) or a folder it cannot write is a one-line error; the outputs are written whole or not at all."""
import shutil
import sys
import tempfile
from pathlib import Path

from model.io import publish
from model.load import CliParser, HelpFormatter

from .common import StepFailed, read_metrics
from .figures import run_curves

def write_curves(run, stem):
    """run_curves into a temp folder beside stem, then each file renamed into place (model.io.publish)."""
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{stem.name}-", dir=stem.parent))
    except OSError as e:
        raise StepFailed(f"cannot write in {stem.parent} ({e.strerror}): give --out a writable folder") from None
    try:
        res = run_curves(run, tmp / "curves.csv", tmp / "curves.png")
        done = {"csv": stem.with_suffix(".csv"), "png": stem.with_suffix(".png") if res["png"] else None}
        for kind, dest in done.items():
            if dest is not None:
                publish(tmp / f"curves.{kind}", dest)
        return done
    except OSError as e:
        raise StepFailed(f"cannot write {stem}.csv/.png ({e.strerror or e}): free space or give --out "
                         f"elsewhere") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv=None):
    p = CliParser(prog="python -m experiments.plot", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("run", help="a train.py run folder (holds metrics.jsonl)")
    p.add_argument("--out", default=None, help="output stem: writes STEM.csv and STEM.png (default: RUN/curves)")
    a = p.parse_args(argv)
    run = Path(a.run)
    try:
        if not run.exists():
            raise StepFailed(f"{run} does not exist (give a train.py run folder)")
        if not run.is_dir():
            raise StepFailed(f"{run} is not a folder (give a train.py run folder)")
        if not (run / "metrics.jsonl").is_file() or not any(
                r.get("step") is not None for r in read_metrics(run / "metrics.jsonl")):
            raise StepFailed(f"{run} has no metrics.jsonl records (has train.py run there yet?)")
        stem = Path(a.out) if a.out else run / "curves"
        if not stem.parent.is_dir():
            raise StepFailed(f"--out {a.out}: folder {stem.parent} does not exist")
        res = write_curves(run, stem)
    except StepFailed as e:
        sys.exit(f"error: {e}")
    print(f"wrote {res['csv']}" + (f" and {res['png']}" if res["png"] else " (matplotlib is not installed: no PNG)"))


if __name__ == "__main__":
    main()
