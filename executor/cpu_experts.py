"""CPU expert FFNs at the machine's limit: weights prepacked once for oneDNN, gate and up fused; INT8 or INT4.

The plain path (`kernels.expert`) hands oneDNN row-major bf16 weights on every call, three GEMMs per expert.
Here each expert's weights are reordered once, on first use, into the blocked layout oneDNN's AMX / AVX-512
kernels read (`torch.ops.mkldnn._reorder_linear_weight`, stock torch), with the gate (w1) and up (w3)
projections stacked into one [2f, h] matrix so the tokens are read once for both. SiLU and the gating product
run in place on the GEMM's output. Where oneDNN reads the plain weights faster for some token counts (a machine's
trait: `benchmarks/hf_moe_block.py` says), `COXMOE_CPU_PACKED_TOKENS=LO:HI` keeps the packed copy for calls of LO
to HI tokens only. INT8 (`precision="int8"`) quantises each weight row symmetrically with its own scale (per
output channel) and each token's activations dynamically with its own scale (per token), and runs oneDNN's
u8 x s8 GEMM (`torch.ops.onednn.qlinear_pointwise`: AMX-INT8 where the CPU has it). INT4 (`precision="int4"`,
weight-only) stores 4-bit weights with a bf16 scale per group of 128 inputs and dequantises an expert per call
(reference numerics, not a fused kernel's speed). Accuracy is checked against the bf16 reference in tests, never
assumed.

INT8's middle step (token scales, SiLU x up, quantisation) is one torch.compile'd loop where a C++ compiler
exists (`COXMOE_CPU_FUSE`). Backends (`COXMOE_CPU_EXPERTS`): `auto` (default: `onednn` where oneDNN runs bf16
natively, else `plain`), `onednn`, `plain`, or `ipex` (Intel Extension for PyTorch's linear, when importable).
"""

from __future__ import annotations

import functools
import os
import shutil
import threading
import warnings

import torch
import torch.nn.functional as F

from sim.errors import SimInputError

PRECISIONS = ("bf16", "int8", "int4")
INT4_GROUP = 128  # weights per 16-bit scale along each row's inputs (sim.specs.model.INT4_GROUP_SIZE)
_INT4_MAX = 7.0
BACKENDS = ("auto", "onednn", "plain", "ipex")
ENV_BACKEND = "COXMOE_CPU_EXPERTS"
ENV_FUSE = "COXMOE_CPU_FUSE"  # auto | compile | eager: how INT8's epilogue (scale, SiLU x up, quantise) runs
PACK_TOKENS_HINT = 64  # tokens oneDNN lays packed weights out for (hints 16-256 timed alike within the VM's noise)
# Tokens per bf16 expert call that run on the prepacked weights, as LO:HI; other calls take the plain row-major
# GEMMs (the same weights, kept anyway for the GPU paths and the reference). Default: every call packed. Where the
# packed layout wins depends on the machine (benchmarks/hf_moe_block.py measures both and prints the band): on
# the AMX Xeon VM of docs/executor.md it won at every size, on the slower one of 2026-12-03 only near its hint.
ENV_PACKED_TOKENS = "COXMOE_CPU_PACKED_TOKENS"
EVERY_CALL = (0, 1 << 62)
_INT8_MAX = 127.0
_ACT_ZERO_POINT = 128  # symmetric int8 activations shifted into oneDNN's u8 input


@functools.cache
def onednn_bf16() -> bool:
    """Whether this torch build and CPU run bf16 GEMMs natively in oneDNN (AVX512-BF16 or AMX)."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def cpu_flags() -> set[str]:
    """The CPU's feature flags as /proc/cpuinfo lists them (empty where there is no such file)."""
    try:
        text = open("/proc/cpuinfo").read()  # noqa: SIM115 - one read
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.split(":", 1)[1].split()) if ":" in line else set()


@functools.cache
def onednn_int8() -> bool:
    """Whether oneDNN's quantised linear runs here at full precision: the CPU needs VNNI or AMX-INT8 (without
    them oneDNN's u8 x s8 products saturate in 16 bits: 9-13% error measured with ONEDNN_MAX_CPU_ISA=AVX512_CORE),
    and a tiny call must run."""
    if not cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"}:
        return False
    try:
        w = torch.ops.onednn.qlinear_prepack(torch.ones(4, 8, dtype=torch.int8), [2, 8])
        torch.ops.onednn.qlinear_pointwise(torch.full((2, 8), _ACT_ZERO_POINT, dtype=torch.uint8), 1.0,
                                           _ACT_ZERO_POINT, w, torch.ones(4), torch.zeros(4, dtype=torch.int64),
                                           None, 1.0, 0, torch.float32, "none", [], "")
    except (AttributeError, RuntimeError):
        return False
    return True


def _ipex():
    try:
        import intel_extension_for_pytorch as ipex  # noqa: PLC0415 - optional, heavy
    except ImportError:
        return None
    return ipex


def backend(requested: str | None = None) -> str:
    """The CPU expert backend to use: `requested`, else $COXMOE_CPU_EXPERTS, else `auto`, resolved."""
    name = (requested or os.environ.get(ENV_BACKEND) or "auto").strip().lower()
    if name not in BACKENDS:
        raise SimInputError(f"{ENV_BACKEND}: unknown CPU expert backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name == "auto":
        return "onednn" if onednn_bf16() else "plain"
    if name == "onednn" and not onednn_bf16():
        raise SimInputError("CPU expert backend 'onednn' needs oneDNN bf16 support (AVX512-BF16 or AMX); this "
                            "CPU or torch build has none: use 'plain'")
    if name == "ipex" and _ipex() is None:
        raise SimInputError("CPU expert backend 'ipex' needs intel-extension-for-pytorch, which is not installed")
    return name


def packed_tokens_band(text: str | None = None) -> tuple[int, int]:
    """The token counts (LO, HI) of bf16 expert calls that use the packed weights: `text` or
    $COXMOE_CPU_PACKED_TOKENS as LO:HI, else every call."""
    text = (os.environ.get(ENV_PACKED_TOKENS) or "") if text is None else text
    if not text.strip():
        return EVERY_CALL
    lo, sep, hi = text.strip().partition(":")
    try:
        band = (int(lo), int(hi)) if sep else None
    except ValueError:
        band = None
    if band is None or not 0 <= band[0] <= band[1]:
        raise SimInputError(f"{ENV_PACKED_TOKENS}: give LO:HI with 0 <= LO <= HI (tokens per expert call), got "
                            f"{text!r}")
    return band


def describe(backend_name: str) -> str:
    """The CPU expert path as a profile's fingerprint records it: the backend, and the packed band when set."""
    band = packed_tokens_band()
    if backend_name != "onednn" or band == EVERY_CALL:
        return backend_name
    return f"{backend_name} packed {band[0]}:{band[1]}"


def gated_ffn(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """The plain math of a gated FFN, (SiLU(x W1) * x W3) W2, with row-major weights: the reference's and the
    fallback of every path here."""
    return (F.silu(x @ w1.T) * (x @ w3.T)) @ w2.T


def silu_mul(a: torch.Tensor, f: int) -> torch.Tensor:
    """SiLU(gate) * up over the fused [T, 2f] projection, computed into the gate half's new buffer."""
    g = F.silu(a[:, :f])
    return g.mul_(a[:, f:])


def quantize_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8 quantisation: (int8 values, fp32 scale per row); an all-zero row gets scale 1."""
    tf = t.float()
    scale = tf.abs().amax(dim=1, keepdim=True).div_(_INT8_MAX)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.round(tf / scale).clamp_(-_INT8_MAX, _INT8_MAX).to(torch.int8), scale


def quantize_groups_int4(t: torch.Tensor, group: int = INT4_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric 4-bit quantisation per group of `group` inputs of each row (the last group may be short): (two
    values a byte, low nibble first, [rows, ceil(cols / 2)] uint8; bf16 scale per group [rows, groups])."""
    rows, cols = t.shape
    groups = -(-cols // group)
    padded = torch.zeros(rows, groups * group, dtype=torch.float32)
    padded[:, :cols] = t.float()
    g = padded.view(rows, groups, group)
    scale = g.abs().amax(dim=2, keepdim=True).div_(_INT4_MAX)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale)).to(torch.bfloat16)
    q = torch.round(g / scale.float()).clamp_(-_INT4_MAX - 1, _INT4_MAX).to(torch.int16).add_(8)
    q = q.view(rows, -1)[:, :cols]
    if cols % 2:
        q = torch.cat([q, torch.full((rows, 1), 8, dtype=torch.int16)], dim=1)
    packed = (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8)
    return packed, scale.view(rows, groups)


def dequantize_groups_int4(packed: torch.Tensor, scale: torch.Tensor, cols: int,
                           group: int = INT4_GROUP) -> torch.Tensor:
    """The bf16 [rows, cols] weights `quantize_groups_int4` stored: unpack the nibbles, scale each group."""
    rows = packed.shape[0]
    q = torch.stack([packed & 0x0F, packed >> 4], dim=2).view(rows, -1)[:, :cols].float().sub_(8)
    groups = scale.shape[1]
    padded = torch.zeros(rows, groups * group, dtype=torch.float32)
    padded[:, :cols] = q
    return (padded.view(rows, groups, group) * scale.float().unsqueeze(2)).view(rows, -1)[:, :cols].to(
        torch.bfloat16)


def quantize_rows_u8(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8 activations as oneDNN's u8 input (zero point 128): scale, shift by 128.5 and cast
    (the cast truncates values in [1.5, 255.5], which rounds); the cheapest sequence measured on an AMX Xeon."""
    amax = t.abs().amax(dim=1, keepdim=True).float()
    scale = torch.where(amax > 0, amax / _INT8_MAX, torch.ones_like(amax))
    shifted = t.float()
    shifted.mul_(scale.reciprocal()).add_(_ACT_ZERO_POINT + 0.5)
    return shifted.to(torch.uint8), scale


class _Bf16Packed:
    """One expert in oneDNN's blocked bf16 layout: gate+up fused [2f, h], down [h, f]."""

    __slots__ = ("w13", "w2", "f")

    def __init__(self, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor):
        self.f = w1.shape[0]
        w13 = torch.cat([w1, w3]).to(torch.bfloat16).contiguous()
        self.w13 = torch.ops.mkldnn._reorder_linear_weight(w13, PACK_TOKENS_HINT)
        self.w2 = torch.ops.mkldnn._reorder_linear_weight(w2.to(torch.bfloat16).contiguous(), PACK_TOKENS_HINT)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lin = torch.ops.mkldnn._linear_pointwise
        a = lin(x.to(torch.bfloat16).contiguous(), self.w13, None, "none", [], "")
        return lin(silu_mul(a, self.f), self.w2, None, "none", [], "")


def scale_silu_mul_quantize(a: torch.Tensor, scale: torch.Tensor, f: int) -> tuple[torch.Tensor, torch.Tensor]:
    """INT8's middle step on the gate+up GEMM output a [T, 2f] (before its token scales `scale` [T, 1]):
    SiLU(gate) * up, then per-token quantisation as in `quantize_rows_u8`: (u8 input of the down GEMM, scales)."""
    a = a.float() * scale
    return quantize_rows_u8(F.silu(a[:, :f]) * a[:, f:])


class _Epilogue:
    """`scale_silu_mul_quantize`, fused into one loop by torch.compile (inductor's C++ backend; compiled once
    for every token count) where a C++ compiler exists, else eager torch ops (about five times slower, measured
    at 256 x 28672 on an AMX Xeon). A failed compilation falls back to eager with a warning."""

    def __init__(self):
        mode = (os.environ.get(ENV_FUSE) or "auto").strip().lower()
        if mode not in ("auto", "compile", "eager"):
            raise SimInputError(f"{ENV_FUSE}: choose auto, compile or eager, got {mode!r}")
        compiler = shutil.which("c++") or shutil.which("g++")
        self.fn = scale_silu_mul_quantize
        if mode == "compile" or (mode == "auto" and compiler):
            self.fn = torch.compile(scale_silu_mul_quantize, dynamic=True)

    def __call__(self, a: torch.Tensor, scale: torch.Tensor, f: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.fn is scale_silu_mul_quantize:
            return self.fn(a, scale, f)
        try:
            return self.fn(a, scale, f)
        except Exception as exc:  # noqa: BLE001 - any compiler failure: the eager ops compute the same thing
            warnings.warn(f"INT8 epilogue not compiled ({type(exc).__name__}); running it eagerly", stacklevel=2)
            self.fn = scale_silu_mul_quantize
            return self.fn(a, scale, f)


@functools.cache
def int8_epilogue() -> _Epilogue:
    return _Epilogue()


def warm_int8_epilogue() -> None:
    """Compile INT8's middle step now, outside any timed run: on one token and on two (a dynamic-shape compile
    still specialises a size of 1, the token count of many decode experts, so one size would leave a recompile
    inside the first timed decode step)."""
    for tokens in (1, 2):
        int8_epilogue()(torch.zeros(tokens, 4, dtype=torch.bfloat16), torch.ones(tokens, 1), 2)


class _Int8Packed:
    """One expert in INT8: per-output-channel weight scales, oneDNN-prepacked s8 weights; per-token activations."""

    __slots__ = ("w13", "s13", "w2", "s2", "zp13", "zp2", "f")

    def __init__(self, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor):
        self.f = w1.shape[0]
        q13, s13 = quantize_rows(torch.cat([w1, w3]))
        q2, s2 = quantize_rows(w2)
        self.s13, self.s2 = s13.view(-1).contiguous(), s2.view(-1).contiguous()
        self.zp13 = torch.zeros(q13.shape[0], dtype=torch.int64)
        self.zp2 = torch.zeros(q2.shape[0], dtype=torch.int64)
        self.w13 = torch.ops.onednn.qlinear_prepack(q13, [PACK_TOKENS_HINT, q13.shape[1]])
        self.w2 = torch.ops.onednn.qlinear_prepack(q2, [PACK_TOKENS_HINT, q2.shape[1]])

    @staticmethod
    def _gemm(u8: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, w_zp: torch.Tensor) -> torch.Tensor:
        """u8 activations (zero point 128, unit scale) x s8 weights: oneDNN applies the weight scales; bf16 out."""
        return torch.ops.onednn.qlinear_pointwise(u8, 1.0, _ACT_ZERO_POINT, w, w_scale, w_zp, None, 1.0, 0,
                                                  torch.bfloat16, "none", [], "")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        u8, scale = quantize_rows_u8(x)
        h8, h_scale = int8_epilogue()(self._gemm(u8, self.w13, self.s13, self.zp13), scale, self.f)
        return self._gemm(h8, self.w2, self.s2, self.zp2).mul_(h_scale)


class _Int4Packed:
    """One expert in 4-bit weights, a 16-bit scale per group of INT4_GROUP inputs (the GPTQ / AWQ layout the
    simulator counts). Each call dequantises the expert's weights to bf16 and runs the plain GEMMs: the reference
    numerics of weight-only INT4 (its bytes at rest are what shrink), not a fused 4-bit kernel's speed."""

    __slots__ = ("q1", "s1", "q3", "s3", "q2", "s2", "h", "f")

    def __init__(self, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor):
        self.f, self.h = w1.shape
        (self.q1, self.s1), (self.q3, self.s3), (self.q2, self.s2) = (quantize_groups_int4(w) for w in (w1, w3, w2))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        w1 = dequantize_groups_int4(self.q1, self.s1, self.h)
        w3 = dequantize_groups_int4(self.q3, self.s3, self.h)
        w2 = dequantize_groups_int4(self.q2, self.s2, self.f)
        return gated_ffn(x.to(torch.bfloat16), w1, w3, w2)


class _IpexPacked:
    """One expert through IPEX's prepacked linear (optional backend, compared in the benchmark)."""

    __slots__ = ("w13", "w2", "f")

    def __init__(self, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor):
        ipex = _ipex()
        self.f = w1.shape[0]
        lin13 = torch.nn.Linear(w1.shape[1], 2 * self.f, bias=False, dtype=torch.bfloat16)
        lin2 = torch.nn.Linear(w2.shape[1], w2.shape[0], bias=False, dtype=torch.bfloat16)
        with torch.no_grad():
            lin13.weight.copy_(torch.cat([w1, w3]))
            lin2.weight.copy_(w2)
        model = ipex.optimize(torch.nn.ModuleList([lin13, lin2]).eval(), dtype=torch.bfloat16, inplace=True)
        self.w13, self.w2 = model[0], model[1]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.w2(silu_mul(self.w13(x.to(torch.bfloat16)), self.f))


_PACKERS = {("onednn", "bf16"): _Bf16Packed, ("onednn", "int8"): _Int8Packed, ("plain", "int8"): _Int8Packed,
            ("ipex", "bf16"): _IpexPacked, ("ipex", "int8"): _Int8Packed,
            **{(b, "int4"): _Int4Packed for b in BACKENDS}}


class CpuExperts:
    """One MoE layer's routed experts as the CPU runs them: each expert packed on first use and kept (the packed
    copy is the backend's own memory, beside the plain weights the GPU paths and the reference read)."""

    def __init__(self, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor, precision: str = "bf16",
                 backend_name: str | None = None, packed_tokens: tuple[int, int] | None = None):
        if precision not in PRECISIONS:
            raise SimInputError(f"CPU expert precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.w1, self.w3, self.w2 = w1, w3, w2
        self.precision, self.backend = precision, backend(backend_name)
        if precision == "bf16" and w1.dtype != torch.bfloat16:
            self.backend = "plain"  # packing would cast other weights to bf16: keep their own precision
        if precision == "int8" and not onednn_int8():
            raise SimInputError("INT8 CPU experts need oneDNN's quantised linear on a CPU with VNNI or AMX-INT8; "
                                "this machine or torch build has neither")
        self._packer = _PACKERS.get((self.backend, self.precision))
        # a call of T tokens uses the packed copy when lo <= T <= hi; oneDNN bf16 only (ENV_PACKED_TOKENS), as
        # the other packed paths compute at their own precision
        self.packed_tokens = ((packed_tokens or packed_tokens_band()) if (self.backend, precision) == ("onednn", "bf16")
                              else EVERY_CALL)
        self._packed: dict[int, object] = {}
        self._lock = threading.Lock()

    def pack(self, e: int):
        """Expert `e` in the backend's layout (built once; thread-safe)."""
        if self._packer is None:  # the plain path keeps no copy
            return None
        hit = self._packed.get(e)
        if hit is None:
            with self._lock:
                hit = self._packed.get(e)
                if hit is None:
                    hit = self._packed[e] = self._packer(self.w1[e], self.w3[e], self.w2[e])
        return hit

    def __call__(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert `e`'s gated FFN over the rows of x [T, h] (bf16 out): on its packed copy when T is in
        `packed_tokens`, else (and on the plain backend) three row-major GEMMs, as the reference computes them."""
        lo, hi = self.packed_tokens
        packed = self.pack(e) if lo <= x.shape[0] <= hi else None
        if packed is None:
            return gated_ffn(x, self.w1[e], self.w3[e], self.w2[e])
        return packed(x)
