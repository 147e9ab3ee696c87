import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))

needs_shared = pytest.mark.skipif(not SHARED.exists(), reason="../shared (real data and weights) not present")

import torch

# Tiny models gain nothing from threads, and on a 2-core CI machine OpenMP contention makes each
# small matmul tens of times slower.
torch.set_num_threads(1)
