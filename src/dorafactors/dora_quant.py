"""QDoRA: the factored row norm over quantized base weights, one bounded row chunk at a time.

Upstream PEFT dequantizes the whole base weight on every forward (and, under PEFT's fp32 adapters,
upcasts it to fp32) just to take DoRA's row norm. Here a quantized base layer is wrapped in a *row
source*: an object that looks like ``W`` [d_out, d_in] to :func:`dorafactors.dora.factored_row_norm`
(``shape``, ``dtype``, ``device``, ``dim()``, ``detach()``) but whose ``W[a:b]`` dequantizes only
rows ``a:b``. So the norm never holds more than one chunk of dequantized rows (bounded by
``PEFT_DORA_NORM_CHUNK_MB``) and never a full-precision copy of ``W``.

Supported bases (what PEFT lets DoRA use):

* bitsandbytes ``Linear4bit`` (NF4 / FP4, with or without double quantization): the packed bytes
  and ``absmax`` blocks of the rows' element range are dequantized by bitsandbytes itself. Blocks
  that straddle two chunks are dequantized by both (a few bytes), so any chunk size works.
* bitsandbytes ``Linear8bitLt``: rows are ``CB[a:b] · SCB[a:b] / 127`` (what PEFT's helper computes
  for the whole weight), in fp32 per chunk as PEFT's helper returns fp32.
* torchao int8 weight-only tensors: ``weight[a:b].dequantize()`` (torchao slices its quantized
  tensors by rows); a tensor type that cannot be sliced is dequantized whole in its own dtype.
* HQQ ``HQQLinear``: HQQ packs rows in pairs across the matrix, so rows cannot be cut out of
  ``W_q``; the weight is dequantized whole by HQQ in its compute dtype (bf16/fp16 in practice,
  never upcast), only when the norm is recomputed, and read in row chunks from there.

Every row source fills ``row_sq`` (``‖W_i‖²`` in fp32) as a side effect of the pass that reads its
rows, so the base term and the cross term come from one dequantization of each chunk: the layer
hands that buffer to ``factored_row_norm`` as ``base_sq``, which reads it only after its cross-term
pass over all rows.

This file is also shipped as ``peft.tuners.lora.dora_quant`` by hf.patch.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

__all__ = ["QuantRows", "quant_rows", "quant_kind"]


def quant_kind(base_layer: Any) -> Optional[str]:
    """``"bnb4"``, ``"bnb8"``, ``"hqq"``, ``"torchao"`` for a quantized base layer, ``None`` otherwise.

    Detected by class names (as PEFT's own helper does), so no quantization library is imported.
    """
    if hasattr(base_layer, "W_q"):
        return "hqq"
    weight = getattr(base_layer, "weight", None)
    if weight is None:
        return None
    name = type(weight).__name__
    if name == "Params4bit":
        return "bnb4"
    if name == "Int8Params":
        return "bnb8"
    if type(weight).__module__.startswith("torchao."):
        return "torchao"
    return None


def _key(t: Optional[torch.Tensor]) -> tuple:
    # quantized storage never changes in place during training; a merge or reload swaps the tensors,
    # which changes the identity, the storage or the version counter
    if t is None:
        return (None,)
    try:
        ptr = t.data_ptr()
    except RuntimeError:  # wrapper subclasses have no storage of their own
        ptr = None
    return (id(t), ptr, t._version, t.dtype, tuple(t.shape))


class QuantRows:
    """A quantized ``W`` [d_out, d_in] that dequantizes row ranges on demand (see module docstring).

    Attributes:
        shape: ``(d_out, d_in)``.
        dtype: dtype of the dequantized rows (what PEFT's ``dequantize_module_weight`` returns).
        device: where the rows are produced.
        row_sq: ``‖W_i‖²`` [d_out] (fp32); once asked for, filled for every row range read through
            ``W[a:b]`` (so a pass that only needs the cross term pays nothing for it).
    """

    kind = "quantized"

    def __init__(self, module: Any, shape: tuple, dtype: torch.dtype, device: torch.device) -> None:
        self.module = module
        self.shape = torch.Size(shape)
        self.dtype = dtype
        self.device = device
        self._row_sq: Optional[torch.Tensor] = None

    @property
    def row_sq(self) -> torch.Tensor:
        if self._row_sq is None:
            acc = torch.float64 if self.dtype == torch.float64 else torch.float32
            self._row_sq = torch.empty(self.shape[0], dtype=acc, device=self.device)
        return self._row_sq

    # -- what factored_row_norm uses of a tensor --------------------------------------------------

    def dim(self) -> int:
        return 2

    def detach(self) -> "QuantRows":
        return self

    def __getitem__(self, rows: slice) -> torch.Tensor:
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            raise TypeError(f"{type(self).__name__} supports contiguous row slices only, got {rows!r}")
        start, stop, _ = rows.indices(self.shape[0])
        stop = max(start, stop)
        with torch.no_grad():
            out = self._rows(start, stop)
            if self._row_sq is not None:
                self._row_sq[start:stop] = torch.linalg.vector_norm(out, dim=1, dtype=self._row_sq.dtype).square()
        return out

    # -- per format -------------------------------------------------------------------------------

    def _rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of ``W`` as a dense [stop − start, d_in] tensor in ``self.dtype``."""
        raise NotImplementedError

    def cache_key(self) -> tuple:
        """Identity of the quantized storage: the norm cache's key for ``W`` (every forward asks)."""
        # bitsandbytes' parameters route every attribute read through __torch_function__: 4x cheaper off
        with torch._C.DisableTorchFunctionSubclass():
            return self._cache_key()

    def _cache_key(self) -> tuple:
        raise NotImplementedError

    def base_output(self, x: torch.Tensor) -> torch.Tensor:
        """``W x`` without bias, through the base layer's own quantized matmul (no dense ``W``)."""
        out = self.module(x)
        bias = getattr(self.module, "bias", None)
        return out - bias.to(out.dtype) if bias is not None else out

    def dequantize(self) -> torch.Tensor:
        """The whole ``W`` (tests and merges only)."""
        return self[0 : self.shape[0]]


class _Bnb4bitRows(QuantRows):
    kind = "bnb4"

    def __init__(self, module):
        weight = module.weight
        state = weight.quant_state
        if state is None:
            raise ValueError(
                "the bitsandbytes Linear4bit base layer is not quantized yet (no quant_state): move it to its "
                "device first (bitsandbytes quantizes on .to(device) / .cuda())"
            )
        if len(state.shape) != 2:
            raise ValueError(f"expected a 2-D 4-bit weight, got quant_state.shape {tuple(state.shape)}")
        super().__init__(module, tuple(state.shape), state.dtype, weight.device)
        self.state = state
        self._absmax = None
        self._whole = None

    def _cache_key(self):
        st = self.state
        return ("bnb4", _key(self.module.weight), id(st), _key(st.absmax), st.quant_type, st.blocksize, st.dtype)

    def _absmax_fp32(self) -> torch.Tensor:
        if self._absmax is None:
            st = self.state
            if st.nested:
                # double quantization: absmax is itself blockwise-quantized (small: one value per block)
                import bitsandbytes.functional as bnbF

                absmax = bnbF.dequantize_blockwise(st.absmax, st.state2) + st.offset
            else:
                absmax = st.absmax
            self._absmax = absmax.float().contiguous()
        return self._absmax

    def _rows(self, start, stop):
        import bitsandbytes.functional as bnbF

        if getattr(self.state, "packing_format_for_cpu", False):
            return self._rows_cpu_packed(start, stop)
        d_in = self.shape[1]
        bs = self.state.blocksize
        numel = self.shape[0] * d_in
        e_start, e_stop = start * d_in, stop * d_in
        if e_stop == e_start:
            return torch.empty(0, d_in, dtype=self.dtype, device=self.device)
        b0, b1 = e_start // bs, -(-e_stop // bs)  # blocks covering the rows' elements
        lo, hi = b0 * bs, min(b1 * bs, numel)
        # packed 4-bit codes as bytes (quant_storage may be another dtype, e.g. bf16 under FSDP); two
        # codes per byte, and block starts are even
        packed = self.module.weight.data.reshape(-1).view(torch.uint8)[lo // 2 : -(-hi // 2)].view(-1, 1)
        part = bnbF.QuantState(absmax=self._absmax_fp32()[b0:b1], shape=torch.Size([hi - lo]), code=self.state.code,
                               blocksize=bs, quant_type=self.state.quant_type, dtype=self.dtype)
        out = bnbF.dequantize_4bit(packed, quant_state=part)
        return out.reshape(-1)[e_start - lo : e_stop - lo].view(stop - start, d_in)

    def _rows_cpu_packed(self, start, stop):
        # bitsandbytes repacks 4-bit weights for its AVX512-BF16 CPU kernels in eval (nibbles permuted,
        # block scales transposed): rows cannot be sliced, so the layer's own kernel rebuilds W once for
        # this pass, W = (layer(I) − bias)ᵀ, in the layer's compute dtype (never fp32)
        if self._whole is None:
            d_in = self.shape[1]
            dtype = getattr(self.module, "compute_dtype", None) or self.dtype
            eye = torch.eye(d_in, dtype=dtype, device=self.device)
            self._whole = self.base_output(eye).T.to(self.dtype)
        return self._whole[start:stop]


class _Bnb8bitRows(QuantRows):
    kind = "bnb8"

    def __init__(self, module):
        weight = module.weight
        if weight.dtype.is_floating_point:
            # has_fp16_weights=True (or not moved to its device yet): the layer holds the real weights
            super().__init__(module, tuple(weight.shape), weight.dtype, weight.device)
            self.scb = None
            return
        if weight.dtype != torch.int8:
            raise ValueError(f"the bitsandbytes Linear8bitLt base layer holds {weight.dtype} weights, expected int8")
        scb = getattr(weight, "SCB", None)
        if scb is None:
            scb = getattr(getattr(module, "state", None), "SCB", None)
        if scb is None:
            raise ValueError("the bitsandbytes Linear8bitLt weight has int8 values but no SCB row scales")
        super().__init__(module, tuple(weight.shape), torch.float32, weight.device)
        self.scb = scb

    def _cache_key(self):
        return ("bnb8", _key(self.module.weight), _key(self.scb))

    def _rows(self, start, stop):
        # row i is CB_i · SCB_i / 127 (PEFT's helper computes this for the whole weight, in fp32)
        cb = self.module.weight.data[start:stop]
        if self.scb is None:
            return cb
        return cb * self.scb[start:stop].view(-1, 1) * (1.0 / 127.0)


class _TorchaoRows(QuantRows):
    kind = "torchao"

    def __init__(self, module):
        weight = module.weight
        if weight.dim() != 2:
            raise ValueError(f"expected a 2-D torchao weight, got shape {tuple(weight.shape)}")
        super().__init__(module, tuple(weight.shape), weight.dtype, weight.device)
        self._whole = None

    def _cache_key(self):
        weight = self.module.weight
        inner = ()
        if hasattr(weight, "__tensor_flatten__"):
            names, _ = weight.__tensor_flatten__()
            inner = tuple(_key(getattr(weight, n, None)) for n in names)
        return ("torchao", id(weight), type(weight).__name__) + inner

    def _rows(self, start, stop):
        weight = self.module.weight
        if self._whole is None:
            try:
                return weight[start:stop].dequantize().to(self.dtype)
            except (NotImplementedError, RuntimeError, TypeError, AttributeError):
                # a layout without row slicing: dequantize once, in its own dtype, for this pass
                self._whole = weight.dequantize()
        return self._whole[start:stop]


class _HqqRows(QuantRows):
    kind = "hqq"

    def __init__(self, module):
        meta = getattr(module, "meta", None) or {}
        shape = meta.get("shape")
        if shape is None or len(shape) != 2:
            raise ValueError(f"HQQ base layer without a 2-D meta['shape'] (got {shape!r})")
        dtype = getattr(module, "compute_dtype", None) or torch.float16
        super().__init__(module, tuple(shape), dtype, module.W_q.device)
        self._whole = None

    def _cache_key(self):
        meta = self.module.meta
        scales = tuple(_key(meta.get(k)) if isinstance(meta.get(k), torch.Tensor) else (k, meta.get(k))
                       for k in ("scale", "zero"))
        return ("hqq", _key(self.module.W_q), id(meta)) + scales

    def _rows(self, start, stop):
        if self._whole is None:
            # HQQ packs row i with row i + d_out/2 (and more for lower bit widths): no row slicing, so
            # dequantize once in HQQ's compute dtype for this pass; freed with this row source
            self._whole = self.module.dequantize().to(self.dtype).reshape(self.shape)
        return self._whole[start:stop]


_SOURCES = {"bnb4": _Bnb4bitRows, "bnb8": _Bnb8bitRows, "torchao": _TorchaoRows, "hqq": _HqqRows}


def quant_rows(base_layer: Any) -> Optional[QuantRows]:
    """A row source for ``base_layer``'s quantized weight, or ``None`` for an unquantized layer.

    Creating one is cheap (nothing is dequantized until rows are read).

    Raises:
        ValueError: for a quantized layer in a state DoRA cannot use, naming what is wrong.
    """
    kind = quant_kind(base_layer)
    if kind is None:
        return None
    with torch._C.DisableTorchFunctionSubclass():  # cheap attribute reads (see cache_key)
        return _SOURCES[kind](base_layer)
