"""A patch whose output differs between processes and that runs an op torch has no deterministic kernel for
(``Tensor.put_`` with ``accumulate=False``, which torch flags on every device). It stands in, on a CPU, for a CUDA
patch written with atomics (a ``scatter_reduce`` token merge): the sequences must call the difference
nondeterministic and name the op, not report a state leak.

The difference itself is planted: the fresh worker process (``CONFORMANCE_WORKER=1``) adds 1e-3 to one value of the
first block's attention output, this process adds nothing."""

from __future__ import annotations

import os

import torch


def patch(model):
    layer = model.model.diffusion_model.transformer_blocks[0].attn.to_out[0]
    offset = 1e-3 if os.environ.get("CONFORMANCE_WORKER") == "1" else 0.0

    def hook(_module, _args, output):
        flat = output.flatten().clone()
        flat.put_(torch.tensor([0], device=flat.device), flat[:1] + offset, accumulate=False)
        return flat.view_as(output)

    layer.register_forward_hook(hook)
    return model
