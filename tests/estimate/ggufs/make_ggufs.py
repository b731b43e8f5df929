"""Writes the GGUF header fixtures of this folder: only the header, metadata and tensor
infos, no tensor data, so each file is tens of KiB while its tensor infos describe the
real model (the estimator reads nothing else).

- DeepSeek-V3 IQ1_S as llama.cpp's converter writes it today (MLA: `attn_k_b`/`attn_v_b`,
  one KV head of 576, the `key_length_mla`/`value_length_mla` keys) and as older
  converters did (`attn_kv_b`, 128 KV heads of 192/128);
- Meta-Llama-3-70B-Instruct Q4_K_M (80 layers, 8 KV heads; Q6_K for attn_v, ffn_down and
  the output as llama.cpp's Q4_K_M mix does for most layers).

    .venv/bin/python tests/estimate/ggufs/make_ggufs.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter

Q = GGMLQuantizationType
HERE = Path(__file__).parent
# DeepSeek-V3 / R1 (config.json)
LAYERS, DENSE, EMBD, HEADS, VOCAB = 61, 3, 7168, 128, 129280
Q_RANK, KV_RANK, NOPE, ROPE, V_DIM = 1536, 512, 128, 64, 128
FF, EXPERTS, FF_EXP = 18432, 256, 2048


def _tensors(mla: bool) -> list[tuple[str, tuple[int, ...], GGMLQuantizationType]]:
    """(name, ggml shape ne0 first, type) of every tensor, as an IQ1_S quant mixes them."""
    out = [("token_embd.weight", (EMBD, VOCAB), Q.Q4_K), ("output_norm.weight", (EMBD,), Q.F32),
           ("output.weight", (EMBD, VOCAB), Q.Q6_K)]
    for i in range(LAYERS):
        b = f"blk.{i}."
        out += [(b + "attn_norm.weight", (EMBD,), Q.F32),
                (b + "attn_q_a_norm.weight", (Q_RANK,), Q.F32),
                (b + "attn_kv_a_norm.weight", (KV_RANK,), Q.F32),
                (b + "attn_q_a.weight", (EMBD, Q_RANK), Q.Q4_K),
                (b + "attn_q_b.weight", (Q_RANK, HEADS * (NOPE + ROPE)), Q.Q4_K),
                (b + "attn_kv_a_mqa.weight", (EMBD, KV_RANK + ROPE), Q.Q4_K),
                (b + "attn_output.weight", (HEADS * V_DIM, EMBD), Q.Q4_K),
                (b + "ffn_norm.weight", (EMBD,), Q.F32)]
        if mla:
            out += [(b + "attn_k_b.weight", (NOPE, KV_RANK, HEADS), Q.Q8_0),
                    (b + "attn_v_b.weight", (KV_RANK, V_DIM, HEADS), Q.Q8_0)]
        else:
            out += [(b + "attn_kv_b.weight", (KV_RANK, HEADS * (NOPE + V_DIM)), Q.Q8_0)]
        if i < DENSE:
            out += [(b + "ffn_gate.weight", (EMBD, FF), Q.Q4_K),
                    (b + "ffn_up.weight", (EMBD, FF), Q.Q4_K),
                    (b + "ffn_down.weight", (FF, EMBD), Q.Q4_K)]
            continue
        out += [(b + "ffn_gate_inp.weight", (EMBD, EXPERTS), Q.F32),
                (b + "exp_probs_b.bias", (EXPERTS,), Q.F32),
                (b + "ffn_gate_exps.weight", (EMBD, FF_EXP, EXPERTS), Q.IQ1_S),
                (b + "ffn_up_exps.weight", (EMBD, FF_EXP, EXPERTS), Q.IQ1_S),
                (b + "ffn_down_exps.weight", (FF_EXP, EMBD, EXPERTS), Q.IQ1_S),
                (b + "ffn_gate_shexp.weight", (EMBD, FF_EXP), Q.Q4_K),
                (b + "ffn_up_shexp.weight", (EMBD, FF_EXP), Q.Q4_K),
                (b + "ffn_down_shexp.weight", (FF_EXP, EMBD), Q.Q4_K)]
    return out


def _llama_tensors() -> list[tuple[str, tuple[int, ...], GGMLQuantizationType]]:
    embd, ff, kv = 8192, 28672, 8 * 128
    out = [("token_embd.weight", (embd, 128256), Q.Q4_K), ("output_norm.weight", (embd,), Q.F32),
           ("output.weight", (embd, 128256), Q.Q6_K)]
    for i in range(80):
        b = f"blk.{i}."
        out += [(b + "attn_norm.weight", (embd,), Q.F32), (b + "ffn_norm.weight", (embd,), Q.F32),
                (b + "attn_q.weight", (embd, embd), Q.Q4_K),
                (b + "attn_k.weight", (embd, kv), Q.Q4_K),
                (b + "attn_v.weight", (embd, kv), Q.Q6_K),
                (b + "attn_output.weight", (embd, embd), Q.Q4_K),
                (b + "ffn_gate.weight", (embd, ff), Q.Q4_K),
                (b + "ffn_up.weight", (embd, ff), Q.Q4_K),
                (b + "ffn_down.weight", (ff, embd), Q.Q6_K)]
    return out


def write_llama(path: Path) -> None:
    w = GGUFWriter(path, "llama")
    w.add_name("Meta-Llama-3-70B-Instruct Q4_K_M")
    w.add_file_type(15)  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    w.add_block_count(80)
    w.add_context_length(8192)
    w.add_embedding_length(8192)
    w.add_feed_forward_length(28672)
    w.add_head_count(64)
    w.add_head_count_kv(8)
    w.add_rope_dimension_count(128)
    w.add_vocab_size(128256)
    _finish(w, path, _llama_tensors())


def _finish(w: GGUFWriter, path: Path,
            tensors: list[tuple[str, tuple[int, ...], GGMLQuantizationType]]) -> None:
    for name, shape, qtype in tensors:
        block, size = GGML_QUANT_SIZES[qtype]
        n = int(np.prod(shape))
        w.add_tensor_info(name, tuple(reversed(shape)), np.dtype(np.float32), n // block * size,
                          raw_dtype=qtype)
    w.write_header_to_file(path)
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()


def write(path: Path, mla: bool) -> None:
    w = GGUFWriter(path, "deepseek2")
    w.add_name("DeepSeek-V3 IQ1_S (" + ("MLA conversion" if mla else "legacy conversion") + ")")
    w.add_file_type(24)  # LLAMA_FTYPE_MOSTLY_IQ1_S
    w.add_block_count(LAYERS)
    w.add_context_length(163840)
    w.add_embedding_length(EMBD)
    w.add_feed_forward_length(FF)
    w.add_head_count(HEADS)
    w.add_rope_dimension_count(ROPE)
    w.add_vocab_size(VOCAB)
    w.add_q_lora_rank(Q_RANK)
    w.add_kv_lora_rank(KV_RANK)
    w.add_leading_dense_block_count(DENSE)
    w.add_expert_count(EXPERTS)
    w.add_expert_used_count(8)
    w.add_expert_shared_count(1)
    w.add_expert_feed_forward_length(FF_EXP)
    if mla:  # llama.cpp's converter since the MLA change: MQA with one 576-wide head
        w.add_head_count_kv(1)
        w.add_key_length(KV_RANK + ROPE)
        w.add_value_length(KV_RANK)
        w.add_key_length_mla(NOPE + ROPE)
        w.add_value_length_mla(V_DIM)
    else:  # older converters: every head keeps its own K and V
        w.add_head_count_kv(HEADS)
        w.add_key_length(NOPE + ROPE)
        w.add_value_length(V_DIM)
    _finish(w, path, _tensors(mla))


if __name__ == "__main__":
    write(HERE / "deepseek-v3-iq1_s-mla.gguf", mla=True)
    write(HERE / "deepseek-v3-iq1_s-legacy.gguf", mla=False)
    write_llama(HERE / "llama-3-70b-instruct-q4_k_m.gguf")
