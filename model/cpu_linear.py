"""nn.Linear with faster CPU paths (CPULinear), and the grouped products of layers that read the same input.

CPULinear has nn.Linear's parameters and, but for fp32 training on some CPUs, its numbers: only which library call
computes a product changes. model.py builds every projection from it; this file is only about speed on CPUs
(bench/RESULTS.md has the measurements behind each rule).
"""

from __future__ import annotations

import platform
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import cpu_has_amx

PACK_MIN_WEIGHT = 128 * 128  # smaller weights stay on F.linear: they sit in cache, where its call is cheaper
# On CPUs with AMX, oneDNN runs a packed weight through another kernel from a few dozen rows on, which sums in another
# order than F.linear's (one output in ~10^4 differs by a rounding) and gains little or loses at thousands of rows
# (bench/RESULTS.md): there only decoding's few rows take the packed weight.
PACK_MAX_ROWS_AMX = 16


def can_pack_bf16_weights() -> bool:
    """Whether bf16 products on this CPU take CPULinear's packed weights: x86 CPUs whose PyTorch has oneDNN's bf16
    kernels (measured with and without AMX)."""
    return (platform.machine().lower() in ("x86_64", "amd64")
            and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def fp32_products_on_onednn() -> bool:
    """Whether fp32 products with gradients run on oneDNN instead of MKL, PyTorch's fp32 BLAS: on AMD CPUs with
    AVX-512, where oneDNN's AVX-512 kernels beat MKL's, which are tuned for Intel's CPUs (measured on Zen 4,
    bench/RESULTS.md; AMD CPUs without AVX-512 are not measured and keep MKL)."""
    if platform.machine().lower() not in ("x86_64", "amd64") or not torch.backends.mkldnn.is_available():
        return False
    try:
        vendor = Path("/proc/cpuinfo").read_text()
    except OSError:
        vendor = platform.processor()
    return "AuthenticAMD" in vendor and torch.backends.cpu.get_cpu_capability().startswith("AVX512")


class _OneDNNLinear(torch.autograd.Function):
    """x @ weight^T + bias in fp32, the forward and the input's gradient through oneDNN; the weight's gradient (a
    sum over every row) stays on MKL, faster than oneDNN at that shape."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.mkldnn._linear_pointwise(grad, weight.t(), None, "none", [], "")
        if ctx.needs_input_grad[1] or (ctx.has_bias and ctx.needs_input_grad[2]):
            rows = grad.reshape(-1, grad.shape[-1])  # a copy when grad is not contiguous: only when needed
            if ctx.needs_input_grad[1]:
                grad_weight = rows.t() @ x.reshape(-1, x.shape[-1])
            if ctx.has_bias and ctx.needs_input_grad[2]:
                grad_bias = rows.sum(0)
        return grad_x, grad_weight, grad_bias


class CPULinear(nn.Linear):
    """nn.Linear with faster CPU paths, decoding first: same parameters, same numbers (but see fp32 training).

    Decoding sends a handful of rows (one per sequence) through every weight per token, so it is bound by how fast a
    product streams its weight from memory and by the fixed cost of each call, and the library's default calls are
    slow at both on CPU (bench/RESULTS.md, decode):
    - bf16 without gradients, on x86 CPUs: a frozen weight (requires_grad False: eval_model's and the server's
      models, DPO's and GRPO's references) is reordered once into oneDNN's blocked layout and kept (a second copy, in
      bf16) until it changes, and the product runs on it. It is the oneDNN product F.linear runs in bf16, equal bit
      for bit, without F.linear's reordering of the weight at every call (its gain is largest at a few rows, smaller
      but still there at thousands; on CPUs with AMX only up to PACK_MAX_ROWS_AMX rows, see there). Layers that read
      the same input (q/k/v, gate/up: see project) keep one stacked copy and make one call. Trained weights are not
      packed: an optimizer may rewrite one in place without bumping its version (fused AdamW does), which would leave
      the copy stale. Nor is fp32 (MKL, PyTorch's fp32 BLAS, sums in another order than oneDNN, and fp32 inference
      matches transformers exactly), a weight under PACK_MIN_WEIGHT, or a module whose `pack` is False (FSDP's: its
      gathered weights are rewritten by collectives that no version counter promises to see).
    - any other single row on CPUs with AMX: torch.mv, since F.linear sends the row through the AMX matmul kernel,
      slower.
    - one row under torch.compile: torch.mv, for which Inductor writes its own kernel, several times faster than
      either library call; a one-row F.linear (or the packed product) would stay a library call.
    - fp32 with gradients (training without autocast) on AMD CPUs with AVX-512: the forward and the input's gradient
      run on oneDNN (_OneDNNLinear), faster than MKL there (fp32_products_on_onednn; a whole training step gains,
      bench/RESULTS.md). Rounded differently from MKL (another order of summation, as between any two BLAS
      libraries); products without gradients keep MKL's numbers.
    """

    matvec = cpu_has_amx()  # class-wide: whether eager single-row CPU products go through torch.mv
    pack = can_pack_bf16_weights()  # whether bf16 products without gradients take the packed weight
    pack_max_rows = PACK_MAX_ROWS_AMX if cpu_has_amx() else None  # the most rows a packed product takes (None: any)
    onednn_fp32 = fp32_products_on_onednn()  # whether fp32 products with gradients run on oneDNN
    _packed: tuple[tuple, torch.Tensor, torch.Tensor | None, list[int]] | None = None  # (what it was built from,
    # weight, bias, out_features of each stacked layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if packs(x, (self,)):
            return self.packed_product(x)[0]
        if ((self.matvec or torch.compiler.is_compiling()) and x.device.type == "cpu"
                and x.shape[:-1].numel() == 1 and not torch.is_autocast_enabled("cpu")):
            v = x.reshape(-1)
            y = torch.mv(self.weight, v) if self.bias is None else torch.addmv(self.bias, self.weight, v)
            return y.view(*x.shape[:-1], self.out_features)
        if (self.onednn_fp32 and torch.is_grad_enabled() and x.device.type == "cpu" and x.dtype == torch.float32
                and self.weight.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
                and not torch.compiler.is_compiling()):
            return _OneDNNLinear.apply(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)

    def packed_product(self, x: torch.Tensor, *others: CPULinear) -> tuple[torch.Tensor, ...]:
        """x's products with this layer and the others (which read the same x) in bf16, as one oneDNN call on their
        stacked frozen weights (packed); one output per layer."""
        weight, bias, sizes = self.packed(*others)
        y = torch.ops.mkldnn._linear_pointwise(x.to(torch.bfloat16), weight, bias, "none", [], "")
        # split_with_sizes, not Tensor.split: no Python wrapper in front of the C++ call (decoding pays per call)
        return y.split_with_sizes(sizes, dim=-1) if others else (y,)

    def packed(self, *others: CPULinear) -> tuple[torch.Tensor, torch.Tensor | None, list[int]]:
        """(weight, bias, out_features of each layer): this layer's and the others' weights stacked in bf16 and
        reordered into oneDNN's layout, for torch.ops.mkldnn._linear_pointwise; packed once, and again whenever one
        changed (a load or an in-place edit bumps a version; a dtype or device move gives new memory)."""
        layers = (self, *others)
        tensors = [t for layer in layers for t in layer._parameters.values() if t is not None]  # weight, bias
        key = tuple((t.data_ptr(), t._version, t.dtype) for t in tensors)
        if self._packed is None or self._packed[0] != key:
            weight = torch.cat([layer.weight.detach() for layer in layers]).to(torch.bfloat16)
            bias = (torch.cat([layer.bias.detach() for layer in layers]).to(torch.bfloat16)
                    if self.bias is not None else None)
            sizes = [layer.out_features for layer in layers]
            self._packed = (key, torch.ops.mkldnn._reorder_linear_weight(weight, 1), bias, sizes)
        return self._packed[1:]

    def __getstate__(self) -> dict:
        # The packed copy is an opaque oneDNN tensor, which can be neither copied nor pickled; it is rebuilt on demand.
        return {**super().__getstate__(), "_packed": None}


def packs(x: torch.Tensor, layers: tuple[nn.Module, ...]) -> bool:
    """Whether x's products with these layers (which all read x) run as one call on their stacked packed copy:
    the rules of CPULinear's docstring, for one layer or a group."""
    if torch.is_grad_enabled() or x.device.type != "cpu" or torch.compiler.is_compiling():
        return False
    if CPULinear.pack_max_rows is not None and x.shape[:-1].numel() > CPULinear.pack_max_rows:
        return False
    autocast = torch.is_autocast_enabled("cpu")
    if (torch.get_autocast_dtype("cpu") if autocast else x.dtype) != torch.bfloat16:
        return False
    # Decoding asks this for every product of every token: one plain loop, and the parameter dicts read directly
    # (nn.Module's attribute lookup of a parameter is slow by comparison; bench/RESULTS.md, decode).
    # .get: a LoRA-wrapped layer keeps no parameters of its own, and is refused in the loop
    biased, size = layers[0]._parameters.get("bias") is not None, 0
    for layer in layers:
        if type(layer) is not CPULinear or not layer.pack:  # not LoRA-wrapped, not FSDP's
            return False
        weight, bias = layer._parameters["weight"], layer._parameters["bias"]
        if (weight.requires_grad or (bias is not None) != biased or (biased and bias.requires_grad)
                or not (autocast or weight.dtype == torch.bfloat16)):
            return False
        size += weight.numel()
    return size >= PACK_MIN_WEIGHT


def project(x: torch.Tensor, *layers: nn.Module) -> tuple[torch.Tensor, ...]:
    """x through several linear layers that read it (q/k/v; gate/up): one call on their stacked packed weights where
    they pack (decoding pays per call: that is a third of the calls), else each layer on its own."""
    if packs(x, layers):
        first, *others = layers
        return first.packed_product(x, *others)
    return tuple(layer(x) for layer in layers)
