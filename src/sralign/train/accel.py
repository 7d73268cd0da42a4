"""The one code path from one CPU to N GPUs: a thin layer over ``accelerate``.

Policies keep their own networks unwrapped (a LoRA backend reaches its adapters, configs and
``disable_adapters()`` directly, also in the middle of a step for ``reference()``), so this
layer does data parallelism the way DDP does it without wrapping the modules: every rank
computes gradients on its own batch, and ``sync_and_clip`` averages the trainable parameters'
gradients over the ranks (one flattened all-reduce) before clipping and the optimizer step.
The result is DDP's: identical parameters on every rank after every step. accelerate brings the
process group (torchrun / ``accelerate launch``; gloo on CPUs), the device, mixed precision and
the prepared optimizer. FSDP and DeepSpeed shard the modules themselves and are refused with a
clear message: the adapters of a LoRA backend are small enough to replicate.
"""

from __future__ import annotations

import contextlib
import os

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


class Accel:
    def __init__(self, mixed_precision: str = "no"):
        if mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision must be no, bf16 or fp16, got {mixed_precision!r}")
        # accelerate only forms a gloo process group on CPUs when told it runs on the CPU: without
        # this, ``torchrun --nproc_per_node 2`` on a machine with no GPU gives 2 unrelated runs
        multi_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
        # accelerate keeps one mixed-precision setting per process and refuses another: a second
        # trainer in the same process (a benchmark, a test) with another setting starts it afresh
        # (the process group, PartialState, is kept)
        prev = AcceleratorState._shared_state.get("_mixed_precision")
        if prev is not None and prev != mixed_precision:
            AcceleratorState._reset_state()
        self.mixed_precision = mixed_precision
        self.acc = Accelerator(mixed_precision=mixed_precision, cpu=multi_cpu)
        if self.acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            raise NotImplementedError(f"sralign's trainers replicate the trainable parameters on every rank (DDP-style); "
                                      f"the accelerate config asks for {self.acc.distributed_type.value}: use a plain multi-GPU config")

    @property
    def rank(self) -> int:
        return self.acc.process_index

    @property
    def world(self) -> int:
        return self.acc.num_processes

    @property
    def is_main(self) -> bool:
        return self.acc.is_main_process

    @property
    def device(self) -> torch.device:
        return self.acc.device

    def prepare(self, policy, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """Move ``policy`` to the device, start every rank from rank 0's trainable parameters,
        and return the prepared optimizer."""
        policy.to(self.device)
        if self.world > 1:
            with torch.no_grad():
                for g in optimizer.param_groups:
                    for p in g["params"]:
                        torch.distributed.broadcast(p.data, src=0)
        return self.acc.prepare(optimizer)

    def backward(self, loss: torch.Tensor) -> None:
        self.acc.backward(loss)

    def sync_and_clip(self, params, max_norm: float) -> torch.Tensor:
        """Average the gradients of ``params`` over the ranks (DDP's all-reduce; a parameter with
        no gradient counts as zero), then clip their global norm. Returns the norm before clipping."""
        params = list(params)
        if self.world > 1:
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            grads = [p.grad for p in params]
            flat = _flatten_dense_tensors(grads)
            torch.distributed.all_reduce(flat)
            flat /= self.world
            for g, avg in zip(grads, _unflatten_dense_tensors(flat, grads)):
                g.copy_(avg)
        return self.acc.clip_grad_norm_(params, max_norm)

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast to this trainer's ``mixed_precision`` on its device (a no-op for "no"). Built
        here rather than from accelerate's process-wide state, which a later ``Accel`` may reset.
        Thread-local, like every autocast: a background thread enters its own."""
        if self.mixed_precision == "no":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.mixed_precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def wait(self) -> None:
        self.acc.wait_for_everyone()
