"""Estimate FLUX.2 [dev] Q4_K at 1024² on 16/24/32/64 GB Macs from the planner, FLOP counts and published
chip and SSD figures (BENCHMARKS.md "Memory planner and layer streaming"). Nothing is loaded or timed.

Both components are sized as the Q4_K_M GGUFs `flux2 convert` writes (the converter's own per-tensor types)
and planned exactly as `flux2 info --plan -m dev --memory-budget B` would plan such files.
"""

from __future__ import annotations

from transformer_step import forward_flops

from flux2_mlx import memory
from flux2_mlx.config import MODELS, text_encoder_shapes, transformer_shapes, vae_shapes
from flux2_mlx.encoder_names import hf_to_llama_cpp
from flux2_mlx.entries import Entry
from flux2_mlx.quant.recipes import tensor_type, text_tensor_type

GB = 1e9
# RAM, budget (Metal's recommended working set: ~2/3 of RAM up to 32 GB, ~3/4 above), assumed GPU
# TFLOP/s at 50 % of the published fp16 peak, SSD GB/s
MACS = [("16 GB (M4)", 16, 2 / 3, (2.1,), (3.0,)), ("24 GB (M4 / M4 Pro)", 24, 2 / 3, (2.1, 4.5), (3.0, 6.0)),
        ("32 GB (M4 Pro)", 32, 2 / 3, (4.5,), (6.0,)), ("64 GB (M4 Max)", 64, 3 / 4, (8.5,), (6.0,))]


def typed(shapes: dict, type_of) -> dict[str, Entry]:
    return {k: Entry(s, lambda: None, type_of(k, s).name) for k, s in shapes.items()}


def main() -> None:
    spec = MODELS["dev"]
    t, te = spec.transformer, spec.text_encoder
    ts, es = transformer_shapes(t), text_encoder_shapes(te)
    tw = memory.component_weights("transformer", typed(ts, lambda k, s: tensor_type(k, s, "Q4_K_M")),
                                  ("double_blocks", "single_blocks"), 2)
    n = len({k.split(".")[2] for k in es if k.startswith("model.layers.")})
    ew = memory.component_weights("text encoder", typed(es, lambda k, s: text_tensor_type(
        hf_to_llama_cpp(k), s, "Q4_K_M", n, te.num_attention_heads // te.num_key_value_heads)),
                                  ("model.layers",), 2)
    vw = memory.component_weights("vae", {k: Entry(s, lambda: None) for k, s in vae_shapes(spec.vae).items()},
                                  (), 4)
    flops = forward_flops(t, 64 * 64, 512)
    print(f"transformer {tw.total / GB:.1f} GB, largest block {max(tw.blocks) / GB:.2f} GB; text encoder "
          f"{ew.total / GB:.1f} GB; {flops:.2e} FLOP per step")
    print("| Mac RAM | budget GB | encode plan | denoise plan | streamed GB/step | read s/step | "
          "compute s/step (est.) | decode |\n| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, ram, share, tflops, ssd in MACS:
        budget = ram * share * GB
        plan = memory.plan_phases(int(budget), transformer=tw, vae=vw, text_encoder=ew, hidden=t.hidden_size,
                                  heads=t.num_heads, te_hidden=te.hidden_size, te_mlp=te.intermediate_size,
                                  te_heads=te.num_attention_heads, width=1024, height=1024, compute_bytes=2,
                                  fused_attention=True, source="disk")
        enc, den, dec = plan.phase("encode"), plan.phase("denoise"), plan.phase("decode")
        streamed = sum(tw.blocks[den.resident_blocks:]) / GB

        def how(p):
            return f"{p.resident_blocks} of {p.blocks} resident" if p.streamed else "all resident"

        read = "–".join(f"{streamed / s:.1f}" for s in sorted(ssd, reverse=True))
        compute = "–".join(f"{flops / (r * 1e12):.0f}" for r in sorted(tflops, reverse=True))
        print(f"| {name} | {budget / GB:.1f} | {how(enc)} | {how(den)} | {streamed:.1f} | {read} | "
              f"~{compute} | {f'{dec.tile} px tiles' if dec.tile else 'whole'} |")


if __name__ == "__main__":
    main()
