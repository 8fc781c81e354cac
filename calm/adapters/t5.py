"""T5 / mT5 adapter: the decoder stack of an encoder-decoder is the exit-able stack.

The encoder runs once per generation (`encode`), which also precomputes every decoder layer's
cross-attention K/V. Decoder self-attention is unscaled and carries T5's relative position bias
(computed by block 0's self-attention from query slots against key slots; decoder inputs have no
padding, so a token's slot is its position, unless the caller passes each slot's position: a
speculative cache has masked holes where drafts were rejected).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import torch

from calm.adapters.base import Adapter, EncoderMemory, StepContext, attend, attention_mask, pick, slot_mask
from calm.errors import UnsupportedModelError

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def _clamp_fp16(h: torch.Tensor) -> torch.Tensor:
    """T5Block's guard against fp16 overflow, reproduced so fp16 numerics match transformers."""
    if h.dtype != torch.float16:
        return h
    top = torch.finfo(h.dtype).max
    clamp_value = torch.where(torch.isinf(h).any(), top - 1000, top)
    return torch.clamp(h, min=-clamp_value, max=clamp_value)


class T5Adapter(Adapter):
    model_types = ("t5", "mt5")
    is_encoder_decoder = True

    def __init__(self, model: PreTrainedModel) -> None:
        cfg = model.config
        if not hasattr(model, "lm_head") or not hasattr(model, "decoder"):
            raise UnsupportedModelError(
                f"{type(model).__name__} has no decoder with an LM head; load it as a ...ForConditionalGeneration model"
            )
        super().__init__(model)
        self.encoder: Any = cast(Any, model.encoder)  # transformers' modules: see Adapter
        self.decoder: Any = cast(Any, model.decoder)
        self.layers: Any = self.decoder.block
        self.num_layers = len(self.layers)
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_heads
        self.head_dim = cfg.d_kv
        self.hidden_size = cfg.d_model
        self.vocab_size = cfg.vocab_size
        # transformers >= 5 records T5's output scaling as `scale_decoder_outputs` (MT5 never scales);
        # older versions scaled whenever the embeddings were tied.
        scale = getattr(cfg, "scale_decoder_outputs", None)
        if scale is None:
            scale = cfg.model_type == "t5" and bool(getattr(cfg, "tie_word_embeddings", True))
        self.output_scale = cfg.d_model**-0.5 if scale else None
        self.relative_bias = self.layers[0].layer[0].SelfAttention

    # ---- encoder ------------------------------------------------------------------------------

    def _heads(self, proj: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, T, D_head]

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> EncoderMemory:
        mask = attention_mask.bool()
        out = self.encoder(input_ids=input_ids, attention_mask=mask.long()).last_hidden_state
        cross = [block.layer[1].EncDecAttention for block in self.layers]
        return EncoderMemory(
            cross_k=tuple(self._heads(a.k, out) for a in cross),
            cross_v=tuple(self._heads(a.v, out) for a in cross),
            mask=mask,
        )

    def decoder_start_ids(self, batch: int) -> torch.Tensor:
        start = self.model.config.decoder_start_token_id
        if start is None:
            start = getattr(getattr(self.model, "generation_config", None), "decoder_start_token_id", None)
        if start is None:
            start = self.model.config.pad_token_id
        if start is None:
            raise UnsupportedModelError("this T5 model's config sets no decoder_start_token_id (nor pad_token_id)")
        return torch.full((batch, 1), int(start), dtype=torch.long, device=self.device)

    # ---- decoder ------------------------------------------------------------------------------

    def embed(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.decoder.embed_tokens(ids)

    def context(
        self,
        positions: torch.Tensor,
        key_mask: torch.Tensor,
        start: int,
        encoder: EncoderMemory | None = None,
        slot_positions: torch.Tensor | None = None,
    ) -> StepContext:
        if encoder is None:
            raise ValueError("the T5 decoder needs the encoder's memory (call encode() first)")
        t = positions.shape[1]
        if slot_positions is None:
            bias = self.relative_bias.compute_bias(t, start + t, device=positions.device, past_seen_tokens=start)
        else:
            bias = self._row_bias(positions, slot_positions[:, : start + t])
        return StepContext(
            positions=positions,
            mask=attention_mask(key_mask, start, t),
            start=start,
            position_bias=bias.to(self.dtype),
            encoder=encoder,
        )

    def static_context(
        self, positions: torch.Tensor, key_mask: torch.Tensor, slot: torch.Tensor, encoder: EncoderMemory | None = None
    ) -> StepContext:
        if encoder is None:
            raise ValueError("the T5 decoder needs the encoder's memory (call encode() first)")
        # query slot `slot` against every key slot; past_seen_tokens may be a tensor (no host sync)
        bias = self.relative_bias.compute_bias(1, key_mask.shape[1], device=key_mask.device, past_seen_tokens=slot)
        return StepContext(
            positions=positions,
            mask=slot_mask(key_mask),
            start=slot,
            position_bias=bias.to(self.dtype),
            encoder=encoder,
        )

    def _row_bias(self, positions: torch.Tensor, slot_positions: torch.Tensor) -> torch.Tensor:
        """Relative position bias [B, H, T, S] from each row's query positions [B, T] and its key slots'
        positions [B, S]."""
        attn = self.relative_bias
        relative = slot_positions[:, None, :] - positions[:, :, None]  # [B, T, S]
        buckets = attn._relative_position_bucket(
            relative,
            bidirectional=False,
            num_buckets=attn.relative_attention_num_buckets,
            max_distance=attn.relative_attention_max_distance,
        )
        return attn.relative_attention_bias(buckets).permute(0, 3, 1, 2)  # [B, H, T, S]

    def attn_input(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        return self.layers[layer].layer[0].layer_norm(h)

    def kv(
        self, layer: int, x: torch.Tensor, ctx: StepContext, rows: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        attn = self.layers[layer].layer[0].SelfAttention
        return self._heads(attn.k, x), self._heads(attn.v, x)

    def finish_layer(
        self,
        layer: int,
        h: torch.Tensor,
        x: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        ctx: StepContext,
        rows: torch.Tensor | None = None,
        q: torch.Tensor | None = None,  # never made: this family's qkv is kv's
    ) -> torch.Tensor:
        block = self.layers[layer]
        self_attn = block.layer[0].SelfAttention
        q = self._heads(self_attn.q, x)
        attn = attend(q, k, v, pick(ctx.mask, rows), 1.0, bias=ctx.position_bias, per_row=ctx.row_attention)
        h = _clamp_fp16(h + self_attn.o(attn))

        cross_layer = block.layer[1]
        cross = cross_layer.EncDecAttention
        enc = ctx.encoder
        if enc is None:
            raise ValueError("the T5 decoder needs the encoder's memory in its context (call encode() first)")
        q = self._heads(cross.q, cross_layer.layer_norm(h))
        enc_mask = pick(enc.mask, rows)[:, None, None, :]  # [R, 1, 1, T_enc]
        out = attend(q, pick(enc.cross_k[layer], rows), pick(enc.cross_v[layer], rows), enc_mask, 1.0)
        h = _clamp_fp16(h + cross.o(out))
        return _clamp_fp16(block.layer[-1](h))

    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        h = self.decoder.final_layer_norm(h)
        return h * self.output_scale if self.output_scale is not None else h
