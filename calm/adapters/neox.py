"""GPT-NeoX (Pythia) and StableLM as Llama-like models: LayerNorm, partial rotary, parallel residual.

Both rotate only the first rotary_pct / partial_rotary_factor of each head's dimensions (their
rotary modules give tables that wide; calm.adapters.llama.apply_rope passes the rest through), and
both may run attention and MLP side by side on one layer input (use_parallel_residual), each in
transformers' order of the additions. GPT-NeoX interleaves q, k and v per head in its fused
query_key_value projection: calm keeps one reordered copy of it (q rows, then k, then v), so the
K/V of a skipped layer costs one matmul over the k|v rows. Its LM head is the separate embed_out.
"""

from __future__ import annotations

from typing import Any

import torch

from calm.adapters.llama import LlamaAdapter


class GPTNeoXAdapter(LlamaAdapter):
    model_types = ("gpt_neox",)
    projections_called = False  # its fused query_key_value weight is read
    inner_name = "gpt_neox"
    final_norm_name = "final_layer_norm"
    fuse_kv_layers = False

    def __init__(self, model: Any) -> None:
        super().__init__(model)
        self.parallel = bool(model.config.use_parallel_residual)
        self._fused: dict[int, tuple[tuple[int, int], torch.Tensor, torch.Tensor | None]] = {}  # see _qkv_weights

    def _attention(self, layer: int) -> Any:
        return self.layers[layer].attention

    def _qkv_weights(self, layer: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """query_key_value's rows [H, 3, D_head] per head reordered to [3, H, D_head] (q|k|v): built once per
        layer, and again whenever the weight changed (its storage, or an in-place update such as an optimizer step).
        A compiled step (which dynamo cannot trace this check in) reads the copy the eager prefill made."""
        proj = self._attention(layer).query_key_value
        cached = self._fused.get(layer)
        if torch.compiler.is_compiling() and cached is not None:
            return cached[1], cached[2]
        stamp = (proj.weight.data_ptr(), proj.weight._version)
        if cached is None or cached[0] != stamp:
            h, d = self.num_heads, self.head_dim
            w = proj.weight.detach().view(h, 3, d, -1).transpose(0, 1).reshape(3 * h * d, -1)
            b = None if proj.bias is None else proj.bias.detach().view(h, 3, d).transpose(0, 1).reshape(-1)
            cached = self._fused[layer] = (stamp, w, b)
        return cached[1], cached[2]

    def _attn_out(self, layer: int, out: torch.Tensor) -> torch.Tensor:
        return self._attention(layer).dense(out)

    def _residual(self, layer: int, h: torch.Tensor, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        block = self.layers[layer]
        if self.parallel:  # x + attn(ln1(x)) + mlp(ln2(x))
            return block.mlp(block.post_attention_layernorm(h)) + o + h
        a = o + h
        return block.mlp(block.post_attention_layernorm(a)) + a


class StableLmAdapter(LlamaAdapter):
    model_types = ("stablelm",)
    fuse_kv_layers = False

    def __init__(self, model: Any) -> None:
        super().__init__(model)
        self.parallel = bool(model.config.use_parallel_residual)
        self.qk_layernorm = bool(model.config.qk_layernorm)

    def _qk_norms(self, layer: int) -> tuple[Any, Any]:
        """StableLM's per-head LayerNorms (qk_layernorm), over heads [B, H, T, D_head]."""
        if not self.qk_layernorm:
            return None, None
        attn = self._attention(layer)
        return attn.q_layernorm, attn.k_layernorm

    def _residual(self, layer: int, h: torch.Tensor, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        if self.parallel:  # x + attn(ln1(x)) + mlp(ln1(x))
            return h + o + self.layers[layer].mlp(x)
        return super()._residual(layer, h, x, o)
