"""Speed machinery around train.py's step: torch.compile of the blocks, CUDA-graph capture and replay of
the whole step (or of each block), the optimizer set-up a captured step needs, step stats copied to the
host without a sync, and the GPU micro-batch probe.
"""
import torch

from echo import IGNORE, supervision

P_BUCKET = 16                # supervised positions per row are padded to a multiple of this (few shapes)


class StatsOnHost:
    """One step's stats, copied into pinned host memory right behind that step on its stream, so reading
    them a step later waits for that step only. (`.tolist()` on the device tensor a step later would queue
    its copy behind the step enqueued since, so the loop would wait for that one too, and the GPU would
    idle while the host prepared the next batch: every step.)"""

    def __init__(self, stats):
        self.values, self.ready = stats, None
        if stats.is_cuda:
            self.values = torch.empty(stats.shape, dtype=stats.dtype, pin_memory=True)
            self.values.copy_(stats, non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record()

    def tolist(self):
        if self.ready is not None:
            self.ready.synchronize()
        return self.values.tolist()


class StepGraphs:
    """--cuda-graphs step: the whole optimizer step (`step_fn`, train.step_once) as one CUDA graph per
    batch shape.

    A small model's step is thousands of tiny kernels, and launching them costs the CPU more time
    than the GPU needs to run them; replaying a captured graph launches them all at once. The first
    batch of each shape runs uncaptured (a real training step, which also compiles the blocks); then
    the step is captured — capture records kernels and runs nothing — and later batches of that shape
    are copied into the graph's input buffers and replayed. Gradients and optimizer state live in
    fixed tensors outside the graphs; everything else a graph allocates is dead when it ends, so all
    graphs share one memory pool (they never run at the same time)."""

    def __init__(self, run, step_fn):
        self.graphs, self.pool, self.step_fn = {}, torch.cuda.graph_pool_handle(), step_fn
        for p in run.params + run.echo_params:
            p.grad = torch.zeros_like(p)

    def step(self, run, inputs, routed, host):
        key = (routed, *(tuple(t.shape) for batch in inputs for t in batch))
        if key not in self.graphs:
            device_inputs = [[t.to(run.device) for t in batch] for batch in inputs]
            stats = self.step_fn(run, device_inputs, routed, host.to(run.device))
            self.graphs[key] = self.capture(run, device_inputs, routed, host.to(run.device))
            return stats
        graph, static_inputs, static_host, stats = self.graphs[key]
        for static_batch, batch in zip(static_inputs, inputs):
            for static_t, t in zip(static_batch, batch):
                static_t.copy_(t, non_blocking=True)
        static_host.copy_(host, non_blocking=True)
        graph.replay()
        return stats           # overwritten by this graph's next replay: Log copies it right behind this one

    def capture(self, run, inputs, routed, host):
        if run.writer is not None:
            run.writer.wait()              # no other thread at work while the stream captures (a rare wait)
        torch.cuda.synchronize(run.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            stats = self.step_fn(run, inputs, routed, host)
        return graph, inputs, host, stats


def keep_grads(params):
    """A CUDA graph writes its outputs, gradients included, into memory that its next replay reuses:
    move gradients accumulated so far out of that pool before the next micro-batch runs (not needed
    after the last one: the optimizer consumes them before any replay)."""
    for p in params:
        if p.grad is not None:
            p.grad = p.grad.clone()


BLOCK_RECOMPILE_LIMIT = 64


def compile_blocks(step_module, cuda_graphs):
    """Regional compilation: each transformer block is compiled (one graph serves every layer and both
    Echo passes; fast to compile), and so is the Echo module (eqs. 2-8: dozens of tiny kernels, one
    graph). cuda_graphs replays them as CUDA graphs, which removes the CPU's kernel-launch overhead."""
    mode = "reduce-overhead" if cuda_graphs else None
    # A block is called in up to 8 contexts that each need a graph of their own (its input requiring grad or not,
    # first layer vs the rest; no mask, the prompt mask or a BlockMask; an Echo site or none), each compiled once
    # with static sizes and again with dynamic batch and length: more than dynamo's default limit of 8, past
    # which the block silently runs eagerly (and a speed figure measures that).
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, BLOCK_RECOMPILE_LIMIT)
    for block in step_module.model.layers:
        block.compile(mode=mode)
    if step_module.echo is not None:
        step_module.echo.compile(mode=mode)
    return step_module


def make_optimizer(params, opts, device, graphed):
    """AdamW; on GPU the fused kernel. A captured step needs its state and learning rate on the GPU
    (capturable, lr a tensor updated in place), so the graph reads the current values at replay."""
    if graphed:
        return torch.optim.AdamW(params, lr=torch.tensor(opts.lr, device=device), weight_decay=opts.weight_decay,
                                 fused=True, capturable=True)
    return torch.optim.AdamW(params, lr=opts.lr, weight_decay=opts.weight_decay, fused=str(device).startswith("cuda"))


def make_trainer(step_module, opts, device, use_compile, graphs):
    """Compile the step module (per --compile / --cuda-graphs) and build what trains it: the adapter's
    parameters, the Echo module's, and one AdamW for each (Echo's is stepped on routed steps only: it
    gets no gradient otherwise). tests/benchmark.py builds its step with this too."""
    if use_compile:
        compile_blocks(step_module, cuda_graphs=graphs == "blocks")
    params = [p for p in step_module.model.parameters() if p.requires_grad]
    echo_params = list(step_module.echo.parameters()) if step_module.echo is not None else []
    optimizers = {"adapter": make_optimizer(params, opts, device, graphs == "step")}
    if echo_params:
        optimizers["echo"] = make_optimizer(echo_params, opts, device, graphs == "step")
    return params, echo_params, optimizers


def set_learning_rate(optimizers, lr):
    for opt in optimizers.values():
        for group in opt.param_groups:
            if torch.is_tensor(group["lr"]):
                group["lr"].fill_(lr)        # in place: a captured step reads this tensor
            else:
                group["lr"] = lr


def pick_micro_batch(step_module, opts, world, device):
    """Rows per forward when --micro-batch is not given: 4 on CPU; on GPU the largest divisor of the
    per-process batch whose routed (both passes) step at --max-len fits in memory, probed at the worst
    case: every position after the first supervised, so the Echo-on window spans the whole row."""
    per_rank = opts.global_batch // world
    if not str(device).startswith("cuda") or per_rank < 1:
        return max(d for d in range(1, min(4, max(per_rank, 1)) + 1) if per_rank % d == 0)
    model = step_module.model
    for mb in [d for d in range(per_rank, 0, -1) if per_rank % d == 0]:
        try:
            tokens = torch.randint(0, model.args.vocab_size, (mb, opts.max_len))
            labels = torch.full_like(tokens, IGNORE)
            labels[:, 1:] = tokens[:, 1:]
            batch = [t.to(device) for t in (tokens, labels, *supervision(labels, P_BUCKET))]
            with torch.autocast("cuda", torch.bfloat16, enabled=opts.dtype == "bf16"):
                loss, _ = step_module(*batch, step_module.echo is not None, torch.tensor(1.0))
            loss.backward()
            step_module.zero_grad(set_to_none=True)
            torch.cuda.synchronize(device)
            del loss, batch
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)    # the eager probe's peak is not the run's
            print(f"micro-batch {mb}: the largest that fits at --max-len {opts.max_len} "
                  f"(of {per_rank} rows per process; --micro-batch overrides)", flush=True)
            return mb
        except torch.OutOfMemoryError:
            step_module.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
    raise ValueError(f"not even a micro-batch of 1 row of {opts.max_len} tokens fits in GPU memory: lower --max-len")
