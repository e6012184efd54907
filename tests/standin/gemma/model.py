"""Text model for Gemma 1/2/3 (stand-in for ``gemma.model``).

A small but real inference implementation written from API facts only:
parameters are created in the default dtype, the KV cache is written in place,
and greedy decoding is deterministic.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gemma import config as gemma_config
from gemma import tokenizer

AttentionType = gemma_config.AttentionType
Architecture = gemma_config.Architecture

KVCache = tuple[torch.Tensor, torch.Tensor]

# The most negative value used to mask attention logits (fits bfloat16).
MASK_VALUE = -2.3819763e38


def precompute_freqs_cis(
    dim: int, end: int, theta: float = 10000.0, rope_scaling_factor: float = 1
) -> torch.Tensor:
    """Returns the rotary factors e^(i * pos * freq) as complex64 (end, dim // 2)."""
    exponents = torch.arange(0, dim, 2, dtype=torch.float32)[: dim // 2] / dim
    inv_freq = 1.0 / (theta**exponents) / rope_scaling_factor
    positions = torch.arange(end, dtype=torch.float32)
    angles = torch.outer(positions, inv_freq)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rotary_emb(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Rotates ``x`` (batch, seq, heads, head_dim) by ``freqs_cis`` (seq, head_dim/2).

    Pairs are formed from the first and second halves of the last dimension.
    """
    first, second = torch.chunk(x.float(), 2, dim=-1)
    x_complex = torch.view_as_complex(torch.stack((first, second), dim=-1).contiguous())
    rotated = x_complex * freqs_cis[None, :, None, :]
    pairs = torch.view_as_real(rotated)
    out = torch.cat((pairs[..., 0], pairs[..., 1]), dim=-1)
    return out.type_as(x)


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, quant: bool) -> None:
        super().__init__()
        self.quant = quant
        if quant:
            self.weight = nn.Parameter(
                torch.empty((out_features, in_features), dtype=torch.int8),
                requires_grad=False,
            )
            self.weight_scaler = nn.Parameter(
                torch.empty(out_features), requires_grad=False
            )
        else:
            self.weight = nn.Parameter(
                torch.empty((out_features, in_features)), requires_grad=False
            )

    def dequantized_weight(self) -> torch.Tensor:
        if self.quant:
            return self.weight * self.weight_scaler.unsqueeze(-1)
        return self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight())


class Embedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int, quant: bool) -> None:
        super().__init__()
        self.quant = quant
        if quant:
            self.weight = nn.Parameter(
                torch.empty((num_embeddings, embedding_dim), dtype=torch.int8),
                requires_grad=False,
            )
            self.weight_scaler = nn.Parameter(
                torch.empty(num_embeddings), requires_grad=False
            )
        else:
            self.weight = nn.Parameter(
                torch.empty((num_embeddings, embedding_dim)), requires_grad=False
            )

    def dequantized_weight(self) -> torch.Tensor:
        if self.quant:
            return self.weight * self.weight_scaler.unsqueeze(-1)
        return self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.embedding(x, self.dequantized_weight())


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6, add_unit_offset: bool = True):
        super().__init__()
        self.eps = eps
        self.add_unit_offset = add_unit_offset
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        scale = self.weight.float()
        if self.add_unit_offset:
            scale = 1 + scale
        return (normed * scale).type_as(x)


class GemmaMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, quant: bool):
        super().__init__()
        self.gate_proj = Linear(hidden_size, intermediate_size, quant)
        self.up_proj = Linear(hidden_size, intermediate_size, quant)
        self.down_proj = Linear(intermediate_size, hidden_size, quant)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = F.gelu(self.gate_proj(x), approximate="tanh")
        return self.down_proj(gate * self.up_proj(x))


class GemmaAttention(nn.Module):
    def __init__(
        self, config: gemma_config.GemmaConfig, attn_type: AttentionType
    ) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        assert self.num_heads % self.num_kv_heads == 0
        self.queries_per_kv = self.num_heads // self.num_kv_heads
        self.hidden_size = config.hidden_size
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        if config.query_pre_attn_scalar is not None:
            self.scaling = config.query_pre_attn_scalar**-0.5
        else:
            self.scaling = self.head_dim**-0.5
        self.qkv_proj = Linear(
            self.hidden_size,
            (self.num_heads + 2 * self.num_kv_heads) * self.head_dim,
            config.quant,
        )
        self.o_proj = Linear(
            self.num_heads * self.head_dim, self.hidden_size, config.quant
        )
        self.query_norm: RMSNorm | None = None
        self.key_norm: RMSNorm | None = None
        if config.use_qk_norm:
            self.query_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.key_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.attn_type = attn_type
        self.sliding_window_size = config.sliding_window_size
        self.attn_logit_softcapping = config.attn_logit_softcapping

    def forward(
        self,
        hidden_states: torch.Tensor,
        freqs_cis: torch.Tensor,
        kv_write_indices: torch.Tensor,
        kv_cache: KVCache,
        mask: torch.Tensor,
        local_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        batch, seq_len, _ = hidden_states.shape
        qkv = self.qkv_proj(hidden_states)
        xq, xk, xv = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        xq = xq.view(batch, seq_len, self.num_heads, self.head_dim)
        xk = xk.view(batch, seq_len, self.num_kv_heads, self.head_dim)
        xv = xv.view(batch, seq_len, self.num_kv_heads, self.head_dim)
        if self.query_norm is not None and self.key_norm is not None:
            xq = self.query_norm(xq)
            xk = self.key_norm(xk)

        xq = apply_rotary_emb(xq, freqs_cis)
        xk = apply_rotary_emb(xk, freqs_cis)

        # Write the new keys and values into the caller's cache, in place.
        k_cache, v_cache = kv_cache
        k_cache.index_copy_(1, kv_write_indices, xk)
        v_cache.index_copy_(1, kv_write_indices, xv)
        key, value = k_cache, v_cache
        if self.num_kv_heads != self.num_heads:
            key = torch.repeat_interleave(key, self.queries_per_kv, dim=2)
            value = torch.repeat_interleave(value, self.queries_per_kv, dim=2)

        q = (xq * self.scaling).transpose(1, 2)  # (b, h, s, d)
        k = key.transpose(1, 2).to(q.dtype)  # (b, h, max_len, d)
        v = value.transpose(1, 2).to(q.dtype)
        scores = torch.matmul(q, k.transpose(2, 3))
        if self.attn_logit_softcapping is not None:
            cap = self.attn_logit_softcapping
            scores = torch.tanh(scores / cap) * cap
        if (
            self.attn_type == AttentionType.LOCAL_SLIDING
            and self.sliding_window_size is not None
            and local_mask is not None
        ):
            mask = local_mask
        scores = scores + mask
        probs = F.softmax(scores.float(), dim=-1).type_as(q)
        out = torch.matmul(probs, v)  # (b, h, s, d)
        out = out.transpose(1, 2).contiguous().view(batch, seq_len, -1)
        return self.o_proj(out)


class GemmaDecoderLayer(nn.Module):
    """Gemma 1 decoder layer."""

    def __init__(self, config: gemma_config.GemmaConfig) -> None:
        super().__init__()
        self.attn_type = AttentionType.GLOBAL
        self.self_attn = GemmaAttention(config, self.attn_type)
        self.mlp = GemmaMLP(config.hidden_size, config.intermediate_size, config.quant)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(
            config.hidden_size, eps=config.rms_norm_eps
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        freqs_cis: torch.Tensor,
        kv_write_indices: torch.Tensor,
        kv_cache: KVCache,
        mask: torch.Tensor,
        local_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        residual = hidden_states
        h = self.input_layernorm(hidden_states)
        h = self.self_attn(
            hidden_states=h,
            freqs_cis=freqs_cis,
            kv_write_indices=kv_write_indices,
            kv_cache=kv_cache,
            mask=mask,
        )
        h = residual + h
        residual = h
        h = self.mlp(self.post_attention_layernorm(h))
        return residual + h


class Gemma2DecoderLayer(nn.Module):
    """Gemma 2 / Gemma 3 decoder layer (extra norms around attention and MLP)."""

    def __init__(
        self, config: gemma_config.GemmaConfig, attn_type: AttentionType
    ) -> None:
        super().__init__()
        self.attn_type = attn_type
        self.self_attn = GemmaAttention(config, attn_type)
        self.mlp = GemmaMLP(config.hidden_size, config.intermediate_size, config.quant)
        eps = config.rms_norm_eps
        self.input_layernorm = RMSNorm(config.hidden_size, eps=eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=eps)
        self.pre_feedforward_layernorm: RMSNorm | None = (
            RMSNorm(config.hidden_size, eps=eps) if config.use_pre_ffw_norm else None
        )
        self.post_feedforward_layernorm: RMSNorm | None = (
            RMSNorm(config.hidden_size, eps=eps) if config.use_post_ffw_norm else None
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        freqs_cis: torch.Tensor,
        kv_write_indices: torch.Tensor,
        kv_cache: KVCache,
        mask: torch.Tensor,
        local_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        residual = hidden_states
        h = self.input_layernorm(hidden_states)
        h = self.self_attn(
            hidden_states=h,
            freqs_cis=freqs_cis,
            kv_write_indices=kv_write_indices,
            kv_cache=kv_cache,
            mask=mask,
            local_mask=local_mask,
        )
        h = self.post_attention_layernorm(h)
        h = residual + h
        residual = h
        if self.pre_feedforward_layernorm is not None:
            h = self.pre_feedforward_layernorm(h)
        h = self.mlp(h)
        if self.post_feedforward_layernorm is not None:
            h = self.post_feedforward_layernorm(h)
        return residual + h


class GemmaModel(nn.Module):
    def __init__(self, config: gemma_config.GemmaConfig) -> None:
        super().__init__()
        self.config = config
        self.vocab_size = config.vocab_size
        self.layers = nn.ModuleList()
        for i in range(config.num_hidden_layers):
            if config.architecture == Architecture.GEMMA_1:
                self.layers.append(GemmaDecoderLayer(config))
            else:
                attn_type = (
                    config.attn_types[i % len(config.attn_types)]
                    if config.attn_types
                    else AttentionType.GLOBAL
                )
                self.layers.append(Gemma2DecoderLayer(config, attn_type))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        freqs_cis: Mapping[AttentionType, torch.Tensor],
        kv_write_indices: torch.Tensor,
        kv_caches: Sequence[KVCache],
        mask: torch.Tensor,
        local_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            hidden_states = layer(
                hidden_states=hidden_states,
                freqs_cis=freqs_cis[layer.attn_type],
                kv_write_indices=kv_write_indices,
                kv_cache=kv_caches[i],
                mask=mask,
                local_mask=local_mask,
            )
        return self.norm(hidden_states)


class Sampler(nn.Module):
    def __init__(self, vocab_size: int, config: gemma_config.GemmaConfig) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.config = config

    @torch.no_grad()
    def forward(
        self,
        embedding: torch.Tensor,
        hidden_states: torch.Tensor,
        output_positions: torch.Tensor,
        temperatures: torch.Tensor | None,
        top_ps: torch.Tensor,
        top_ks: torch.Tensor,
        embedding_bias: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # (batch, seq, hidden) -> (batch, hidden) at the output position.
        hidden = hidden_states.index_select(1, output_positions).squeeze(1)
        logits = torch.matmul(hidden, embedding.t().to(hidden.dtype))
        if embedding_bias is not None:
            logits = logits + embedding_bias
        cap = self.config.final_logit_softcapping
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap

        if temperatures is None:
            # As gemma: squeezed, so a batch of one gives a 0-d tensor.
            return torch.argmax(logits, dim=-1).squeeze(dim=-1), logits

        probs = torch.softmax(
            logits.float() / temperatures.float().unsqueeze(dim=1), dim=-1
        )
        probs_sorted, order = torch.sort(probs, dim=-1, descending=True)
        # Top-p: drop tokens once the mass before them exceeds top_p.
        mass_before = torch.cumsum(probs_sorted, dim=-1) - probs_sorted
        probs_sorted = torch.where(mass_before > top_ps.unsqueeze(1), 0.0, probs_sorted)
        # Top-k: keep the first top_k entries of the sorted distribution.
        ranks = torch.arange(probs_sorted.shape[-1], device=probs_sorted.device)
        probs_sorted = torch.where(
            ranks.unsqueeze(0) >= top_ks.unsqueeze(1), 0.0, probs_sorted
        )
        probs_sorted = probs_sorted / probs_sorted.sum(dim=-1, keepdim=True)
        probs = torch.zeros_like(probs_sorted).scatter(-1, order, probs_sorted)
        next_token_ids = torch.multinomial(probs, num_samples=1).squeeze(dim=-1)
        return next_token_ids, logits


def _load_weights(module: nn.Module, model_path: str) -> None:
    """Loads a single-file checkpoint or a sharded folder into ``module``."""
    if os.path.isfile(model_path):
        checkpoint = torch.load(model_path, mmap=True, weights_only=True)
        module.load_state_dict(checkpoint["model_state_dict"], strict=False)
        return
    index_path = os.path.join(model_path, "pytorch_model.bin.index.json")
    with open(index_path, encoding="utf-8") as f:
        index = json.load(f)
    for shard in dict.fromkeys(index["weight_map"].values()):
        state_dict = torch.load(
            os.path.join(model_path, shard), map_location="cpu", weights_only=True
        )
        module.load_state_dict(state_dict, strict=False)
        del state_dict


def _register_rope_buffers(
    module: nn.Module, config: gemma_config.GemmaConfig, scale_global: bool
) -> None:
    head_dim = config.head_dim
    max_len = config.max_position_embeddings * 2
    if config.architecture == Architecture.GEMMA_3:
        if config.rope_wave_length is None:
            raise ValueError("rope_wave_length must be provided for Gemma3.")
        local_theta = config.rope_wave_length.get(AttentionType.LOCAL_SLIDING, 10000)
        global_theta = config.rope_wave_length.get(AttentionType.GLOBAL, 10000)
        scaling = (config.rope_scaling_factor or 1) if scale_global else 1
        module.register_buffer(
            "local_freqs_cis",
            precompute_freqs_cis(head_dim, max_len, theta=local_theta),
        )
        module.register_buffer(
            "global_freqs_cis",
            precompute_freqs_cis(
                head_dim, max_len, theta=global_theta, rope_scaling_factor=scaling
            ),
        )
    else:
        module.register_buffer("freqs_cis", precompute_freqs_cis(head_dim, max_len))


def _select_freqs_cis(
    module: nn.Module, config: gemma_config.GemmaConfig, positions: torch.Tensor
) -> dict[AttentionType, torch.Tensor]:
    if config.architecture == Architecture.GEMMA_3:
        return {
            AttentionType.LOCAL_SLIDING: module.local_freqs_cis.index_select(
                0, positions
            ),
            AttentionType.GLOBAL: module.global_freqs_cis.index_select(0, positions),
        }
    freqs = module.freqs_cis.index_select(0, positions)
    return {AttentionType.LOCAL_SLIDING: freqs, AttentionType.GLOBAL: freqs}


class GemmaForCausalLM(nn.Module):
    def __init__(self, config: gemma_config.GemmaConfig) -> None:
        super().__init__()
        self.config = config
        assert config.hidden_size % config.num_attention_heads == 0
        self.tokenizer = tokenizer.Tokenizer(config.tokenizer)
        self.embedder = Embedding(config.vocab_size, config.hidden_size, config.quant)
        self.model = GemmaModel(config)
        self.sampler = Sampler(config.vocab_size, config)
        _register_rope_buffers(self, config, scale_global=True)

    @torch.no_grad()
    def forward(
        self,
        input_token_ids: torch.Tensor,
        input_positions: torch.Tensor,
        kv_write_indices: torch.Tensor | None,
        kv_caches: Sequence[KVCache],
        mask: torch.Tensor,
        output_positions: torch.Tensor,
        temperatures: torch.Tensor | None,
        top_ps: torch.Tensor,
        top_ks: torch.Tensor,
        local_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        freqs_cis = _select_freqs_cis(self, self.config, input_positions)
        kv_write_indices = input_positions

        hidden_states = self.embedder(input_token_ids)
        normalizer = torch.tensor(
            self.config.hidden_size**0.5,
            dtype=hidden_states.dtype,
            device=hidden_states.device,
        )
        hidden_states = hidden_states * normalizer

        hidden_states = self.model(
            hidden_states=hidden_states,
            freqs_cis=freqs_cis,
            kv_write_indices=kv_write_indices,
            kv_caches=kv_caches,
            mask=mask,
            local_mask=local_mask,
        )
        embedder_weight = self.embedder.weight
        if self.config.quant:
            embedder_weight = embedder_weight * self.embedder.weight_scaler.unsqueeze(
                -1
            )
        return self.sampler(
            embedding=embedder_weight,
            hidden_states=hidden_states,
            output_positions=output_positions,
            temperatures=temperatures,
            top_ps=top_ps,
            top_ks=top_ks,
        )

    def generate(
        self,
        prompts: str | Sequence[str],
        device: Any,
        output_len: int = 100,
        temperature: float | None = 1.0,
        top_p: float = 0.95,
        top_k: int = 64,
    ) -> str | list[str]:
        """Generates continuations of ``prompts``; greedy when temperature is None."""
        is_str_prompt = isinstance(prompts, str)
        prompt_list: list[str] = [prompts] if is_str_prompt else list(prompts)
        batch_size = len(prompt_list)
        prompt_tokens = [self.tokenizer.encode(p) for p in prompt_list]
        min_prompt_len = min(len(p) for p in prompt_tokens)
        max_prompt_len = max(len(p) for p in prompt_tokens)
        max_seq_len = max_prompt_len + output_len
        assert max_seq_len <= self.config.max_position_embeddings

        kv_caches: list[KVCache] = []
        cache_shape = (
            batch_size,
            max_seq_len,
            self.config.num_key_value_heads,
            self.config.head_dim,
        )
        cache_dtype = self.config.get_dtype()
        for _ in range(self.config.num_hidden_layers):
            k_cache = torch.zeros(size=cache_shape, dtype=cache_dtype, device=device)
            v_cache = torch.zeros(size=cache_shape, dtype=cache_dtype, device=device)
            kv_caches.append((k_cache, v_cache))

        pad_id = self.tokenizer.pad_id
        token_ids = torch.full((batch_size, max_seq_len), pad_id, dtype=torch.int64)
        input_token_ids = torch.full(
            (batch_size, min_prompt_len), pad_id, dtype=torch.int64
        )
        prompt_mask = torch.zeros((batch_size, max_seq_len), dtype=torch.bool)
        for i, p in enumerate(prompt_tokens):
            token_ids[i, : len(p)] = torch.tensor(p)
            prompt_mask[i, : len(p)] = True
            input_token_ids[i, :min_prompt_len] = torch.tensor(p[:min_prompt_len])
        token_ids = token_ids.to(device)
        prompt_mask = prompt_mask.to(device)
        input_token_ids = input_token_ids.to(device)
        input_positions = torch.arange(0, min_prompt_len, dtype=torch.int64).to(device)

        mask_tensor = torch.full(
            (1, 1, max_seq_len, max_seq_len), MASK_VALUE, dtype=torch.float32
        ).triu(diagonal=1)
        local_mask_tensor: torch.Tensor | None = None
        if self.config.sliding_window_size is not None:
            rows = torch.arange(max_seq_len).unsqueeze(1)
            cols = torch.arange(max_seq_len).unsqueeze(0)
            allowed = (cols <= rows) & (rows - cols < self.config.sliding_window_size)
            local_mask_tensor = torch.where(allowed, 0.0, MASK_VALUE)[None, None]
            local_mask_tensor = local_mask_tensor.to(torch.float32).to(device)
        mask_tensor = mask_tensor.to(device)

        curr_mask = mask_tensor.index_select(2, input_positions)
        curr_local_mask = (
            local_mask_tensor.index_select(2, input_positions)
            if local_mask_tensor is not None
            else None
        )
        output_positions = torch.tensor([min_prompt_len - 1], dtype=torch.int64).to(
            device
        )
        temperatures = (
            None
            if not temperature
            else torch.full((batch_size,), float(temperature)).to(device)
        )
        top_ps = torch.full((batch_size,), float(top_p)).to(device)
        top_ks = torch.full((batch_size,), int(top_k), dtype=torch.int64).to(device)
        output_index = torch.tensor([min_prompt_len], dtype=torch.int64).to(device)

        for _ in range(max_seq_len - min_prompt_len):
            next_token_ids, _ = self(
                input_token_ids=input_token_ids,
                input_positions=input_positions,
                kv_write_indices=None,
                kv_caches=kv_caches,
                mask=curr_mask,
                output_positions=output_positions,
                temperatures=temperatures,
                top_ps=top_ps,
                top_ks=top_ks,
                local_mask=curr_local_mask,
            )
            # Keep prompt tokens where the prompt is longer than the prefill.
            curr_prompt_mask = prompt_mask.index_select(1, output_index).squeeze(1)
            curr_token_ids = token_ids.index_select(1, output_index).squeeze(1)
            output_token_ids = torch.where(
                curr_prompt_mask, curr_token_ids, next_token_ids
            ).unsqueeze(1)
            token_ids.index_copy_(1, output_index, output_token_ids)

            input_token_ids = output_token_ids
            input_positions = output_index.clone()
            curr_mask = mask_tensor.index_select(2, input_positions)
            if local_mask_tensor is not None:
                curr_local_mask = local_mask_tensor.index_select(2, input_positions)
            output_positions = torch.tensor([0], dtype=torch.int64).to(device)
            output_index = output_index + 1

        results: list[str] = []
        for i, tokens in enumerate(token_ids.tolist()):
            start = len(prompt_tokens[i])
            generated = tokens[start : start + output_len]
            if self.tokenizer.eos_id in generated:
                generated = generated[: generated.index(self.tokenizer.eos_id)]
            results.append(self.tokenizer.decode(generated))
        return results[0] if is_str_prompt else results

    def load_weights(self, model_path: str) -> None:
        _load_weights(self, model_path)
