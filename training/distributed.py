"""Processes: torchrun's ranks and their backend, stop requests (Ctrl-C / SIGTERM) that every rank obeys at
the same step, the routing agreement check, and the one-line exit when a peer dies.
"""
import os
import signal
import sys
import time

import torch
import torch.distributed as dist


class RoutingMismatch(RuntimeError):
    """The ranks drew different Echo routing decisions: a bug, not a lost peer."""


def setup_distributed(device, share_gpu=False):
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; plain `python train.py` is one process.
    Returns (rank, world, device). --device cpu uses gloo even on a GPU machine (multi-process tests,
    or CPU-only runs). NCCL refuses two ranks on one GPU, so `share_gpu` (--ranks-share-gpu) runs
    them over gloo, which all-reduces CUDA tensors through host memory: the multi-GPU code path
    (DDP, per-block graphs, no_sync accumulation, the shared router) on one GPU, for tests."""
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA GPU is visible")
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if share_gpu and not cuda:
        raise ValueError("--ranks-share-gpu needs a CUDA device (--device cuda)")
    if "RANK" not in os.environ:
        return 0, 1, "cuda" if cuda else "cpu"
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if not cuda:
        dist.init_process_group("gloo")
        return rank, world, "cpu"
    per_node, gpus = int(os.environ.get("LOCAL_WORLD_SIZE", local + 1)), torch.cuda.device_count()
    if per_node > gpus and not share_gpu:
        raise ValueError(f"{per_node} processes on this node but {gpus} GPU(s) visible: use torchrun "
                         f"--nproc_per_node {gpus}, or --device cpu (--ranks-share-gpu: several ranks on one "
                         f"GPU, for testing the multi-GPU path)")
    index = local % gpus
    torch.cuda.set_device(index)
    if per_node > gpus:
        dist.init_process_group("gloo")
    else:
        dist.init_process_group("nccl", device_id=torch.device("cuda", index))
    return rank, world, f"cuda:{index}"


def smallest_over_ranks(value, world, device):
    """The smallest of each rank's value (e.g. the micro-batch each probed: ranks on one GPU, or on GPUs of
    different sizes, may differ, and every rank must run the same number of micro-batches)."""
    if world == 1:
        return value
    t = torch.tensor([value], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def check_routing_agrees(routing, rank, world):
    """Every rank must have routed the same steps (eq. 9's draw is shared): checked once, at the end."""
    every_rank = [None] * world
    dist.all_gather_object(every_rank, routing)
    differ = [r for r, decisions in enumerate(every_rank) if decisions != routing]
    if differ:
        raise RoutingMismatch(f"Echo routing differed between ranks (rank {rank} vs ranks {differ}): the "
                              f"router must be seeded alike on every rank — a bug, please report it")
    if rank == 0:
        print(f"routing identical on all {world} ranks: {sum(routing)} of {len(routing)} steps routed", flush=True)


class StopRequest:
    """Ctrl-C / SIGTERM (cluster schedulers send it before they kill): finish the current step, write a
    checkpoint, say where, exit with 128 + signal (130 / 143). A second signal exits at once."""

    def __init__(self):
        self.signum, self.previous = 0, {}
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self.previous[s] = signal.signal(s, self.handle)
            except ValueError:             # not the main thread (e.g. an embedding application)
                pass

    def handle(self, signum, frame):
        if self.signum:
            os._exit(128 + signum)
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: stopping after this step with a checkpoint "
              f"(send it again to exit at once)", file=sys.stderr, flush=True)

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


# A gloo worker thread may still hold the last work it finished (a barrier delays freeing the works before it)
# after the caller has moved on; dropping it frees tensors Python already let go of, which takes the GIL. Once the
# interpreter is shutting down, CPython ends such a thread inside that C++ destructor and the process aborts
# ("terminate called without an active exception", SIGABRT, after the run's files are written). DDP keeps the
# group alive past destroy_process_group, so its workers are never joined: give them the GIL for a moment.
WORKERS_LET_GO_S = 0.5


def leave(world):
    if world > 1:
        dist.barrier()                 # leave together: a rank tearing down gloo early can abort its peer
        dist.destroy_process_group()
        time.sleep(WORKERS_LET_GO_S)


def exit_with_one_line(main):
    """Run main(); a bad input or a failed run ends in one `error: ...` line, never a traceback."""
    try:
        main()
    except (ValueError, FileNotFoundError, FloatingPointError, KeyError, OSError, RoutingMismatch) as e:
        sys.exit(f"error: {e}")
    except RuntimeError as e:
        if int(os.environ.get("WORLD_SIZE", 1)) == 1:
            raise
        # A collective failed: another process died (or hung). Its own log has the cause; say so in one
        # line instead of this rank's traceback, which only shows where it was waiting.
        sys.exit(f"error: rank {os.environ.get('RANK')}: lost contact with another process "
                 f"({str(e).splitlines()[0][:160]}); see the other ranks' output for the cause — the last "
                 f"checkpoint in --out continues with --resume")
