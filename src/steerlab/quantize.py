"""Weight-only int8 / int4 linear layers for CPU decoding: fewer weight bytes streamed per token.

A decode step at batch 1 multiplies one row by every weight matrix, so on a CPU it is bound by
reading the weights from memory (bench/roofline.py). Storing them in fewer bytes is the lever:

* ``int8``: every ``nn.Linear`` as int8 with one scale per output row (4x fewer bytes than fp32).
* ``int4``: the decoder blocks' linears as 4-bit codes in groups of 32 inputs, each group with its
  own scale and offset (~7x fewer bytes), and the output head as ``int8``. The embedded SmolLM2 comes
  from a Q4_1 GGUF whose blocks are exactly such groups, so its decoder weights are stored again on
  the grid they came from: only the scales and offsets round to bfloat16, 0.25 % relative error on
  those weights against 0.85 % for int8 (per row). The head came from an 8-bit tensor, which a
  4-bit grid would coarsen, hence int8 there.

The products run in torch's own CPU kernels for weight-only quantisation (``_weight_int8pack_mm``,
``_weight_int4pack_mm_for_cpu``, which torchao's CPU paths call), with the activations cast to
bfloat16 at the layer's input and back at its output: the residual stream, where steering adds,
keeps the model's dtype, so :mod:`steerlab.hooks` needs nothing new. ``weight`` dequantises on
demand for readers of the matrix (the logit lens). Owns no generation and no device choice.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import ModelLoadError

MODES = ("none", "int8", "int4")
GROUP = 32  # inputs per int4 group: the block size of GGUF's Q4 formats
_ACT = torch.bfloat16  # the kernels' fast activation dtype on CPU (fp32 input is 10x slower)


class Int8Linear(nn.Module):
    """``y = x W^T + b`` with ``W`` as int8 codes times one scale per output row."""

    codes: torch.Tensor
    scale: torch.Tensor

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("codes", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(_ACT))
        self.bias = linear.bias

    @property
    def weight(self) -> torch.Tensor:
        return self.codes.float() * self.scale.float()[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(_ACT)
        y = torch.ops.aten._weight_int8pack_mm(flat, self.codes, self.scale).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


class Int4Linear(nn.Module):
    """``y = x W^T + b`` with ``W`` as 4-bit codes per group of :data:`GROUP` inputs: ``w = q * scale + low``."""

    packed: torch.Tensor
    scale_zero: torch.Tensor

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        w = linear.weight.detach().float()
        n, k = w.shape
        g = w.reshape(n, k // GROUP, GROUP)
        low, high = g.amin(dim=-1), g.amax(dim=-1)
        scale = ((high - low) / 15).clamp_min(1e-12)
        codes = torch.round((g - low[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32).reshape(n, k)
        self.in_features, self.out_features = k, n
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1))
        # the kernel computes (q - 8) * scale + zero, so zero = low + 8 * scale; layout [k / GROUP, n, 2]
        scale_zero = torch.stack([scale.t(), (low + 8 * scale).t()], dim=-1)
        self.register_buffer("scale_zero", scale_zero.contiguous().to(_ACT))
        self.bias = linear.bias

    @property
    def weight(self) -> torch.Tensor:
        eye = torch.eye(self.in_features, dtype=_ACT)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.packed, GROUP, self.scale_zero).float().t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(_ACT)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed, GROUP, self.scale_zero).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


def quantize_model(model: nn.Module, mode: str) -> int:
    """Replace ``model``'s plain ``nn.Linear`` layers in place (``mode``: int8 or int4); returns how many.

    CPU only. In ``int4`` mode the output head, and any layer whose shape the int4 kernel does not
    take (inputs not in groups of :data:`GROUP`, outputs not a multiple of 16), become int8."""
    if mode not in MODES:
        raise ModelLoadError(f"unknown quantisation {mode!r}: use {', '.join(MODES)}")
    if mode == "none":
        return 0
    if next(model.parameters()).device.type != "cpu":
        raise ModelLoadError(f"--quantize {mode} runs on CPU only (its kernels are torch's CPU ones); "
                             "use --device cpu, or --dtype bfloat16 on a GPU")
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    swaps = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if type(child) is nn.Linear]
    for parent, name, child in swaps:
        int4 = (mode == "int4" and child is not head and child.in_features % GROUP == 0
                and child.out_features % 16 == 0)
        setattr(parent, name, Int4Linear(child) if int4 else Int8Linear(child))
    return len(swaps)
