"""Memory planner: what each phase (encode, denoise, decode) needs, from the files' real tensor types, and
how it fits a budget: resident, or streamed with as many blocks kept as fit.

Device bytes follow what the backends allocate: dense tensors in the compute dtype, GGUF tensors as
affine triplets (quant/affine.py, which both backends keep quantized) or, for Q6_K, Q3_K and Q2_K, as the
file's blocks (quant/kblocks.py; the dense weight one layer decodes per call is transient workspace, left
to the headroom like the matmul's own). Activation peaks are linear in
the tokens or pixels; each backend measures its own coefficients (`Activations`, from its
`device_memory()`; BENCHMARKS.md "Memory planner"). Attention scores count only where attention is not
fused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .config import TEXT_TOKENS
from .entries import FP8_BLOCKS, block_key
from .quant.affine import affine_format
from .quant.ggml import GGMLType, block_info
from .quant.kblocks import FIELDS
from .quant.scaled import SCALED_TYPES, mlx_decodes

GB = 1e9
TILE_OVERLAP = 64  # pixels of context each side of a decoded tile, cross-faded with the neighbour
# Plans fill the budget less this share: room for what the estimate leaves out (the interpreter, a host
# tensor being read, estimate error of a few per cent), so the measured peak, RSS too, stays under it.
HEADROOM = 0.05


class MemoryPlanError(ValueError):
    """The model cannot run within the budget, even streamed; the message has the numbers."""


@dataclass(frozen=True)
class Activations:
    """A backend's activation peaks: hidden-sized rows per token while a double / a single transformer
    block runs, rows of (hidden + MLP width) per token in a text-encoder layer, float32 maps of 128
    channels per pixel in the VAE decoder / encoder. The defaults were measured on MLX's CPU backend."""

    transformer_rows: tuple[float, float] = (19.0, 30.1)
    text_rows: float = 6.2
    vae_decode_maps: float = 77.2
    vae_encode_maps: float = 46.3
    fixed: int = 0  # bytes every peak has beyond the linear part (a framework's GEMM and conv workspaces)


@dataclass(frozen=True)
class Streaming:
    """What a backend's loader needs to stream: blocks before `resident` (in execution order) stay on the
    device; `keep_host` keeps the others' host copies (stream from RAM) instead of re-reading the file."""

    resident: int
    keep_host: bool


def tensor_bytes(stored: str, shape: tuple[int, ...], compute_bytes: int, fp8_kept: bool = False,
                 full_precision: bool = False) -> int:
    """Device bytes of one tensor once loaded. fp8_kept: the backend holds FP8 weights as stored (one byte
    each and a float32 scale per 128 × 128 block, the layout of every Qwen3 FP8 release; a per-tensor-scaled
    FP8 layer with its one scale), as torch does; else block-scaled FP8 is decoded and a per-tensor-scaled
    layer runs as MLX's mxfp8 (an E8M0 byte per 32). full_precision: an FP8 / MXFP8 / NVFP4 layer marked
    for a full-precision matmul, which torch keeps as stored (decoding it per call) and MLX decodes once."""
    n = math.prod(shape)
    if fp8_kept and stored in FP8_BLOCKS:
        return n + 4 * -(-n // (128 * 128))
    if not fp8_kept and stored in SCALED_TYPES and mlx_decodes(shape, full_precision, stored == "FP8"):
        return n * compute_bytes
    if stored == "NVFP4":  # 4-bit codes and an E4M3 byte per 16, on both backends
        return n // 2 + n // 16
    if stored == "FP8":
        return n + (4 if fp8_kept else n // 32)  # MLX's mxfp8 scales, all 2⁰
    if stored == "MXFP8":  # a byte a weight and an E8M0 byte per 32
        return n + n // 32
    t = GGMLType[stored] if stored in GGMLType.__members__ else None
    if t in FIELDS:  # the file's bytes, split into fields
        elements, size = block_info(t)
        return n // elements * size
    fmt = affine_format(t) if t is not None else None
    if fmt is None:
        return n * compute_bytes
    bits, group = fmt
    return n * bits // 8 + 2 * (n // group) * compute_bytes


@dataclass
class Weights:
    """Device bytes of one component: `fixed` outside its repeated blocks, `blocks` in execution order."""

    name: str
    fixed: int
    blocks: list[int]
    kinds: list[int]  # per block: which block list it is in (double 0 / single 1; encoder layers 0)

    @property
    def total(self) -> int:
        return self.fixed + sum(self.blocks)


def component_weights(name: str, entries: dict, block_lists: tuple[str, ...], compute_bytes: int,
                      fp8_kept: bool = False) -> Weights:
    """Size a component from its canonical entries (entries.Entry: shape and stored type)."""
    blocks: dict[tuple[int, int], int] = {}
    fixed = 0
    for key, e in entries.items():
        b = (tensor_bytes(e.stored, tuple(e.shape), compute_bytes, fp8_kept, e.full_precision)
             + e.beside * compute_bytes)
        k = block_key(key, block_lists)
        if k:
            blocks[k[:2]] = blocks.get(k[:2], 0) + b
        else:
            fixed += b
    return Weights(name, fixed, [blocks[k] for k in sorted(blocks)], [k[0] for k in sorted(blocks)])


def transformer_activations(hidden: int, heads: int, tokens: int, compute_bytes: int, fused: bool,
                            batch: int = 1, act: Activations = Activations()) -> tuple[int, int]:
    """Peak activation bytes while a double and while a single block runs."""
    scores = 0 if fused else heads * tokens * tokens * compute_bytes
    return tuple(int(batch * (rows * tokens * hidden * compute_bytes + scores)) + act.fixed
                 for rows in act.transformer_rows)


def text_activations(hidden: int, mlp: int, heads: int, batch: int, compute_bytes: int, fused: bool,
                     act: Activations = Activations(), tokens: int = TEXT_TOKENS) -> tuple[int]:
    L = tokens
    scores = 0 if fused else heads * L * L * compute_bytes
    return (int(batch * (act.text_rows * L * (hidden + mlp) * compute_bytes + scores)) + act.fixed,)


def vae_activations(maps_per_pixel: float, width: int, height: int, ch: int = 128, fixed: int = 0) -> int:
    """float32 (the VAE always runs in float32)."""
    return int(maps_per_pixel * width * height * ch * 4) + fixed


@dataclass
class Phase:
    name: str  # encode | images | denoise | decode
    component: str
    weights: int  # device bytes of the component
    activations: int
    others: int  # bytes of other components resident during this phase (the VAE)
    resident_blocks: int
    blocks: int
    prefetch: int  # bytes of the next streamed block, placed ahead by the prefetch thread (0 when resident)
    held: int  # device bytes of weights held at the peak: all, or the resident ones + the running block
    tile: int = 0  # images, decode: tile edge in pixels, 0 = untiled

    @property
    def streamed(self) -> bool:
        return self.resident_blocks < self.blocks

    @property
    def peak(self) -> int:
        """The budgeted peak: what the backend's allocator holds at most (MLX's peak memory), the next
        streamed block included."""
        return self.held + self.prefetch + self.activations + self.others


@dataclass
class MemoryPlan:
    """How each phase of one run (encode, images, denoise, decode) fits the budget."""

    budget: int
    source: str  # "ram" | "disk": where streamed blocks come from
    phases: list[Phase] = field(default_factory=list)

    @property
    def usable(self) -> int:
        return usable(self.budget)

    def phase(self, name: str) -> Phase | None:
        return next((p for p in self.phases if p.name == name), None)

    def streaming(self, name: str) -> Streaming | None:
        p = self.phase(name)
        if p is None or not p.streamed:
            return None
        return Streaming(p.resident_blocks, self.source == "ram")

    @property
    def peak(self) -> int:
        return max(p.peak for p in self.phases)

    @property
    def keeps_both(self) -> bool:
        """Whether text encoder and transformer fit the budget together, each phase's peak beside the other
        component's weights: a "phase" pipeline then keeps both between generations, and a new prompt
        reloads nothing."""
        enc, den = self.phase("encode"), self.phase("denoise")
        if enc is None or den is None or enc.streamed or den.streamed:
            return False
        return max(enc.peak + den.held, den.peak + enc.weights) <= self.usable

    def describe(self) -> str:
        lines = [f"memory budget {self.budget / GB:.2f} GB ({self.usable / GB:.2f} GB planned, "
                 f"{HEADROOM:.0%} kept free); predicted peak {self.peak / GB:.2f} GB"]
        for p in self.phases:
            if p.streamed:
                how = (f"streamed from {self.source}: {p.resident_blocks} of {p.blocks} blocks resident, "
                       f"{p.blocks - p.resident_blocks} read just in time")
            elif p.tile:
                how = f"resident, tiled in {p.tile}px tiles"
            else:
                how = "resident"
            lines.append(f"  {p.name:8s} {p.component:13s} {how}; weights {p.weights / GB:.2f} GB "
                         f"(held {p.held / GB:.2f} + prefetch {p.prefetch / GB:.2f}), activations "
                         f"{p.activations / GB:.2f} GB, "
                         f"peak {p.peak / GB:.2f} GB")
        return "\n".join(lines)


def _device_peak(c: Weights, acts: tuple[int, ...], resident: int) -> tuple[int, int, int]:
    """(weights held, next block placed ahead, activations) at the device peak. The weights outside the
    blocks and the first `resident` blocks stay; each later block is on the device while it runs, and
    while the block before it runs (the prefetch thread places it one ahead, cyclically across steps)."""
    stay = c.fixed + sum(c.blocks[:resident])
    streamed = list(zip(c.blocks[resident:], c.kinds[resident:]))
    first = streamed[0][0] if streamed else 0
    running = [(0, first, acts[k]) for k in c.kinds[:resident]]
    running += [(b, streamed[(i + 1) % len(streamed)][0], acts[k]) for i, (b, k) in enumerate(streamed)]
    b, ahead, a = max(running or [(0, 0, max(acts))], key=sum)
    return stay + b, ahead, a


def _fit(name: str, c: Weights, acts: tuple[int, ...], others: int, budget: int) -> Phase:
    """Resident when it fits, else the most leading blocks that fit beside a running and a prefetched one."""
    n = len(c.blocks)

    def phase(k: int) -> Phase:
        held, ahead, act = _device_peak(c, acts, k)
        return Phase(name, c.name, c.total, act, others, k, n, ahead, held)

    p = phase(n)
    if p.peak <= budget or n == 0:
        return p
    k = n - 1
    while k >= 0 and phase(k).peak > budget:
        k -= 1
    if k < 0:
        p = phase(0)
        raise MemoryPlanError(
            f"{name} needs at least {p.peak / GB:.2f} GB even streamed ({c.name}: {c.fixed / GB:.2f} GB "
            f"outside its blocks, blocks of up to {max(c.blocks) / GB:.2f} GB running and prefetched, "
            f"{max(acts) / GB:.2f} GB activations" + (f", {others / GB:.2f} GB VAE" if others else "")
            + f"), more than the {budget / GB:.2f} GB usable of the budget; use a smaller quantization "
              f"(e.g. a Q4_K GGUF), a smaller image, or raise --memory-budget")
    return phase(k)


def plan_phases(budget: int, *, transformer: Weights, vae: Weights, text_encoder: Weights | None, hidden: int,
                heads: int, te_hidden: int = 0, te_mlp: int = 0, te_heads: int = 0, width: int, height: int,
                compute_bytes: int, fused_attention: bool, cfg_batch: int = 1, source: str = "ram",
                vae_ch: int = 128, ref_tokens: int = 0, image_size: tuple[int, int] | None = None,
                activations: Activations = Activations(), text_tokens: int = TEXT_TOKENS) -> MemoryPlan:
    """One plan for a run: the VAE stays resident throughout (it is small next to the others); the encoder
    and the transformer each get the whole budget less the VAE in their own phase.

    ref_tokens: reference-image tokens the transformer attends to beside the output's; image_size: the
    largest input image (references, img2img start) the VAE encodes, or None; text_tokens: the prompt's
    padded length."""
    tokens = text_tokens + (height // 16) * (width // 16) + ref_tokens
    out = MemoryPlan(budget, source)
    budget = usable(budget)
    if text_encoder is not None:
        act = text_activations(te_hidden, te_mlp, te_heads, cfg_batch, compute_bytes, fused_attention,
                               activations, text_tokens)
        out.phases.append(_fit("encode", text_encoder, act, vae.total, budget))
    if image_size is not None:
        out.phases.append(_vae_phase("images", activations.vae_encode_maps, vae, *image_size, budget, vae_ch,
                                     activations.fixed))
    act = transformer_activations(hidden, heads, tokens, compute_bytes, fused_attention, act=activations)
    out.phases.append(_fit("denoise", transformer, act, vae.total, budget))
    out.phases.append(_vae_phase("decode", activations.vae_decode_maps, vae, width, height, budget, vae_ch,
                                 activations.fixed))
    return out


def usable(budget: int) -> int:
    """What a plan may fill of `budget` bytes."""
    return int(budget * (1 - HEADROOM))


def _vae_phase(name: str, maps: float, vae: Weights, width: int, height: int, budget: int, ch: int,
               fixed: int = 0) -> Phase:
    """Untiled when it fits; else the largest square tile (a multiple of 256 px, with its blending margin)
    that does. The VAE's activations grow with pixels, so tiles bound them."""
    p = Phase(name, vae.name, vae.total, vae_activations(maps, width, height, ch, fixed), 0, 0, 0, 0,
              vae.total)
    tile = 2048
    while p.peak > budget and tile >= 256:
        side = tile + 2 * TILE_OVERLAP
        p.tile, p.activations = tile, vae_activations(maps, min(side, width), min(side, height), ch, fixed)
        tile -= 256
    if p.peak > budget:
        what = "decoding" if name == "decode" else "encoding the input images"
        raise MemoryPlanError(f"{what} needs at least {p.peak / GB:.2f} GB even in {p.tile}px tiles, "
                              f"more than the {budget / GB:.2f} GB usable of the budget; "
                              f"raise --memory-budget")
    return p
