"""Not a test: train.py's main for one torchrun rank, which kills its own process (SIGKILL, as kill -9)
half-way through writing its Nth checkpoint when ECHO_KILL_AT_CHECKPOINT=N (state.pt.tmp half written,
nothing renamed). tests/test_gpu_ranks.py launches it in place of train.py."""
import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train  # noqa: E402
from training.distributed import exit_with_one_line  # noqa: E402

KILL_AT = int(os.environ.get("ECHO_KILL_AT_CHECKPOINT", 0))
real_save, saves = torch.save, []


def save(obj, f, *a, **k):
    if str(f).endswith("state.pt.tmp"):
        saves.append(1)
        if len(saves) == KILL_AT:
            real_save(obj, f, *a, **k)
            with open(f, "r+b") as fh:
                fh.truncate(os.path.getsize(f) // 2)
            os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *a, **k)


torch.save = save
exit_with_one_line(lambda: train.main(sys.argv[1:]))
