"""Gemma 3 multimodal model (stand-in for ``gemma.gemma3_model``).

The stand-in has no vision tower: ``config.vision_config`` is not required and
is ignored, and only text inputs are supported. ``generate`` is not provided;
``forward`` runs one text-only step with the same arguments as
``gemma.model.GemmaForCausalLM.forward``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from gemma import config as gemma_config
from gemma import model as gemma_model
from gemma import tokenizer


class Gemma3ForMultimodalLM(nn.Module):
    """Text-only stand-in for the Gemma 3 multimodal model."""

    def __init__(self, config: gemma_config.GemmaConfig) -> None:
        super().__init__()
        self.dtype = config.get_dtype()
        assert config.architecture == gemma_config.Architecture.GEMMA_3
        self.config = config
        self.tokenizer = tokenizer.Tokenizer(config.tokenizer)
        self.text_token_embedder = gemma_model.Embedding(
            config.vocab_size, config.hidden_size, config.quant
        )
        self.model = gemma_model.GemmaModel(config)
        self.sampler = gemma_model.Sampler(config.vocab_size, config)
        gemma_model._register_rope_buffers(self, config, scale_global=True)

    @torch.no_grad()
    def forward(
        self,
        input_token_ids: torch.Tensor,
        input_positions: torch.Tensor,
        kv_write_indices: torch.Tensor | None,
        kv_caches: Sequence[gemma_model.KVCache],
        mask: torch.Tensor,
        output_positions: torch.Tensor,
        temperatures: torch.Tensor | None,
        top_ps: torch.Tensor,
        top_ks: torch.Tensor,
        local_mask: torch.Tensor | None = None,
        image_patches: torch.Tensor | None = None,
        image_presence_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if image_patches is not None:
            raise NotImplementedError("The gemma stand-in has no vision tower.")
        freqs_cis = gemma_model._select_freqs_cis(self, self.config, input_positions)
        hidden_states = self.text_token_embedder(input_token_ids)
        normalizer = torch.tensor(
            self.config.hidden_size**0.5,
            dtype=hidden_states.dtype,
            device=hidden_states.device,
        )
        hidden_states = hidden_states * normalizer
        hidden_states = self.model(
            hidden_states=hidden_states,
            freqs_cis=freqs_cis,
            kv_write_indices=input_positions,
            kv_caches=kv_caches,
            mask=mask,
            local_mask=local_mask,
        )
        return self.sampler(
            embedding=self.text_token_embedder.dequantized_weight(),
            hidden_states=hidden_states,
            output_positions=output_positions,
            temperatures=temperatures,
            top_ps=top_ps,
            top_ks=top_ks,
        )

    def load_weights(self, model_path: str) -> None:
        gemma_model._load_weights(self, model_path)
