"""Memory planner: what each phase (encode, denoise, decode) needs, from the files' real tensor types, and
how it fits a budget: resident, or streamed with as many blocks kept as fit.

Device bytes follow what the MLX backend allocates: dense tensors in the compute dtype, GGUF tensors as
MLX affine triplets (quant/mlx_layout.py). Activation peaks are fitted to MLX measurements (CPU backend,
float32; BENCHMARKS.md "Memory planner"): the transformer holds ~30 hidden-sized rows per token while a
block runs, the text encoder ~6.2 rows of (hidden + MLP width), the VAE decoder ~77 and encoder ~46
float32 maps of 128 channels per pixel. Attention scores count only where attention is not fused.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from .quant.ggml import GGMLType
from .quant.mlx_layout import REQUANT

GB = 1e9
TRANSFORMER_ROWS_PER_TOKEN = 30.1
TEXT_ROWS_PER_TOKEN = 6.2
VAE_DECODE_MAPS_PER_PIXEL = 77.2
VAE_ENCODE_MAPS_PER_PIXEL = 46.3
IN_FLIGHT = 2  # streamed blocks held at once: the one running and the one being prefetched
TEXT_TOKENS = 512
TILE_OVERLAP = 64  # pixels of context each side of a decoded tile, cross-faded with the neighbour

_EXACT_BITS = {"Q4_0": 4, "Q4_1": 4, "Q4_K": 4, "Q5_0": 5, "Q5_1": 5, "Q5_K": 5, "Q8_0": 8}


class MemoryPlanError(ValueError):
    """The model cannot run within the budget, even streamed; the message has the numbers."""


@dataclass(frozen=True)
class Streaming:
    """What a backend's loader needs to stream: blocks before `resident` (in execution order) stay on the
    device; `keep_host` keeps the others' host copies (stream from RAM) instead of re-reading the file."""

    resident: int
    keep_host: bool


def tensor_bytes(stored: str, shape: tuple[int, ...], compute_bytes: int) -> int:
    """Device bytes of one tensor once loaded."""
    n = math.prod(shape)
    if stored in _EXACT_BITS or (stored and stored in GGMLType.__members__ and GGMLType[stored] in REQUANT):
        bits, group = (_EXACT_BITS[stored], 32) if stored in _EXACT_BITS else REQUANT[GGMLType[stored]]
        return n * bits // 8 + 2 * (n // group) * compute_bytes
    return n * compute_bytes


@dataclass
class Weights:
    """Device bytes of one component: `fixed` outside its repeated blocks, `blocks` in execution order."""

    name: str
    fixed: int
    blocks: list[int]

    @property
    def total(self) -> int:
        return self.fixed + sum(self.blocks)


def component_weights(name: str, entries: dict, block_lists: tuple[str, ...], compute_bytes: int) -> Weights:
    """Size a component from its canonical entries (keymap.Entry: shape and stored type)."""
    pattern = re.compile(r"^(%s)\.(\d+)\." % "|".join(re.escape(b) for b in block_lists))
    blocks: dict[tuple[int, int], int] = {}
    fixed = 0
    for key, e in entries.items():
        b = tensor_bytes(e.stored, tuple(e.shape), compute_bytes)
        m = pattern.match(key)
        if m:
            k = (block_lists.index(m.group(1)), int(m.group(2)))
            blocks[k] = blocks.get(k, 0) + b
        else:
            fixed += b
    return Weights(name, fixed, [blocks[k] for k in sorted(blocks)])


def transformer_activations(hidden: int, heads: int, tokens: int, compute_bytes: int, fused: bool,
                            batch: int = 1) -> int:
    scores = 0 if fused else heads * tokens * tokens * compute_bytes
    return int(batch * (TRANSFORMER_ROWS_PER_TOKEN * tokens * hidden * compute_bytes + scores))


def text_activations(hidden: int, mlp: int, heads: int, batch: int, compute_bytes: int, fused: bool) -> int:
    L = TEXT_TOKENS
    scores = 0 if fused else heads * L * L * compute_bytes
    return int(batch * (TEXT_ROWS_PER_TOKEN * L * (hidden + mlp) * compute_bytes + scores))


def vae_decode_activations(width: int, height: int, ch: int = 128) -> int:
    """float32 (the VAE always runs in float32)."""
    return int(VAE_DECODE_MAPS_PER_PIXEL * width * height * ch * 4)


@dataclass
class Phase:
    name: str  # encode | denoise | decode
    component: str
    weights: int  # device bytes of the component
    activations: int
    others: int  # bytes of other components resident during this phase (the VAE)
    resident_blocks: int
    blocks: int
    in_flight: int  # bytes of streamed blocks held at once
    held: int  # device bytes of weights held at the peak: all of them, or resident ones + in flight
    tile: int = 0  # decode: tile edge in pixels, 0 = untiled

    @property
    def streamed(self) -> bool:
        return self.resident_blocks < self.blocks

    @property
    def peak(self) -> int:
        return self.held + self.activations + self.others


@dataclass
class Plan:
    budget: int
    source: str  # "ram" | "disk": where streamed blocks come from
    phases: list[Phase] = field(default_factory=list)

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

    def describe(self) -> str:
        lines = [f"memory budget {self.budget / GB:.1f} GB; predicted peak {self.peak / GB:.2f} GB"]
        for p in self.phases:
            if p.streamed:
                how = (f"streamed from {self.source}: {p.resident_blocks} of {p.blocks} blocks resident, "
                       f"{p.blocks - p.resident_blocks} read just in time")
            elif p.tile:
                how = f"resident, tiled in {p.tile}px tiles"
            else:
                how = "resident"
            lines.append(f"  {p.name:8s} {p.component:13s} {how}; weights {p.weights / GB:.2f} GB "
                         f"(held {p.held / GB:.2f}), activations {p.activations / GB:.2f} GB, "
                         f"peak {p.peak / GB:.2f} GB")
        return "\n".join(lines)


def _fit(name: str, component: Weights, activations: int, others: int, budget: int) -> Phase:
    """Resident when it fits, else the largest count of leading blocks that fits beside IN_FLIGHT streamed ones."""
    n = len(component.blocks)
    p = Phase(name, component.name, component.total, activations, others, n, n, 0, component.total)
    if p.peak <= budget or n == 0:
        return p
    in_flight = IN_FLIGHT * max(component.blocks)
    room = budget - component.fixed - in_flight - activations - others
    if room < 0:
        need = component.fixed + in_flight + activations + others
        raise MemoryPlanError(
            f"{name} needs at least {need / GB:.2f} GB even streamed ({component.name}: "
            f"{component.fixed / GB:.2f} GB outside its blocks + {IN_FLIGHT} blocks of "
            f"{max(component.blocks) / GB:.2f} GB in flight + {activations / GB:.2f} GB activations"
            + (f" + {others / GB:.2f} GB VAE" if others else "")
            + f"), more than the {budget / GB:.1f} GB budget; use a smaller quantization (e.g. a Q4_K GGUF), "
              f"a smaller image, or raise --memory-budget")
    k, used = 0, 0
    while k < n and used + component.blocks[k] <= room:
        used += component.blocks[k]
        k += 1
    p.resident_blocks, p.in_flight, p.held = k, in_flight, component.fixed + used + in_flight
    return p


def plan(budget: int, *, transformer: Weights, vae: Weights, text_encoder: Weights | None, hidden: int,
         heads: int, te_hidden: int = 0, te_mlp: int = 0, te_heads: int = 0, width: int, height: int,
         compute_bytes: int, fused_attention: bool, cfg_batch: int = 1, source: str = "ram") -> Plan:
    """One plan for a run: the VAE stays resident throughout (it is small next to the others); the encoder
    and the transformer each get the whole budget less the VAE in their own phase."""
    tokens = TEXT_TOKENS + (height // 16) * (width // 16)
    out = Plan(budget, source)
    if text_encoder is not None:
        act = text_activations(te_hidden, te_mlp, te_heads, cfg_batch, compute_bytes, fused_attention)
        out.phases.append(_fit("encode", text_encoder, act, vae.total, budget))
    act = transformer_activations(hidden, heads, tokens, compute_bytes, fused_attention)
    out.phases.append(_fit("denoise", transformer, act, vae.total, budget))
    out.phases.append(_decode_phase(vae, width, height, budget))
    return out


def _decode_phase(vae: Weights, width: int, height: int, budget: int) -> Phase:
    """Untiled when it fits; else the largest square tile (a multiple of 256 px, with its blending margin)
    that does. The decoder's activations grow with pixels, so tiles bound them."""
    p = Phase("decode", vae.name, vae.total, vae_decode_activations(width, height), 0, 0, 0, 0, vae.total)
    tile = 2048
    while p.peak > budget and tile >= 256:
        side = tile + 2 * TILE_OVERLAP
        p.tile, p.activations = tile, vae_decode_activations(min(side, width), min(side, height))
        tile -= 256
    if p.peak > budget:
        raise MemoryPlanError(f"decoding needs at least {p.peak / GB:.2f} GB even in {p.tile}px tiles, more than "
                              f"the {budget / GB:.1f} GB budget; raise --memory-budget")
    return p
