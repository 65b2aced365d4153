"""`HarnessLM`: an lm_eval LM backed by the harness's GPT, for `loglikelihood`, `loglikelihood_rolling`
and `generate_until`.

It is lm_eval's own `HFLM` with the model calls replaced, so every request goes through exactly the
tokenization, context / continuation split, rolling windows, batching, padding, truncation and
stop-sequence handling lm_eval's `hf` model uses; only the two calls into the model are the harness's:

    _model_call(inps)          the logits of right-padded rows (B, T, vocab): GPT's forward, fp32 logits
    _model_generate(context)   greedy or sampled continuation of left-padded prompts: GPT.generate with
                               each row's prompt length (its own positions, no query reads a padding key),
                               the tokenizer's eos ending a row; HFLM cuts the text at the stop sequences

so on the same weights its numbers are lm_eval's `hf` model's (tests/test_evaluate.py).
"""

from __future__ import annotations

from typing import Any

import torch
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import configure_pad_token


class HarnessLM(HFLM):
    """lm_eval's HFLM over a harness GPT (trainer.model.gpt) and a Hugging Face tokenizer."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, *, batch_size: int = 1, max_length: int | None = None,
                 device: str | torch.device = "cpu", name: str = "trainer") -> None:  # fmt: skip
        from lm_eval.api.model import TemplateLM
        from transformers import AutoModelForCausalLM

        TemplateLM.__init__(self)  # not HFLM's: it would load a transformers model
        self._model = model.eval()
        self._device = torch.device(device)
        self.tokenizer = configure_pad_token(tokenizer)
        self.AUTO_MODEL_CLASS, self.backend = AutoModelForCausalLM, "causal"
        self._max_length = max_length or model.cfg.block_size
        self.batch_size_per_gpu, self.batch_schedule, self.max_batch_size, self.batch_sizes = (
            batch_size,
            1,
            batch_size,
            {},
        )
        self.logits_cache, self.truncation, self.add_bos_token = True, False, None
        self.custom_prefix_token_id, self.think_end_token, self.enable_thinking = None, None, None
        self.chat_template_args: dict[str, Any] = {}
        self.mixed_precision_dtype = self.softmax_dtype = None
        self.vocab_size = model.cfg.vocab_size
        self.pretrained, self.revision, self.delta, self.peft = name, "main", None, None
        self._rank, self._world_size = 0, 1

    @property
    def model(self) -> torch.nn.Module:
        return self._model

    def _model_call(self, inps: torch.Tensor, attn_mask: Any = None, labels: Any = None) -> torch.Tensor:
        """Logits (B, T, vocab) of rows padded on the right (causal: padding never reaches a real token)."""
        with torch.no_grad():
            return self._model(inps.to(self.device)).float()

    def _model_generate(self, context: torch.Tensor, max_length: int, stop: list[str], **kwargs: Any) -> torch.Tensor:
        """Rows of context (left-padded, kwargs["attention_mask"] marks the real tokens) continued up to
        max_length tokens in all: greedy at temperature 0 (lm_eval's default), else sampled."""
        mask = kwargs.get("attention_mask")
        lengths = mask.sum(dim=1) if mask is not None else None
        temperature = float(kwargs.get("temperature", 0.0) or 0.0)
        if kwargs.get("do_sample") is False:
            temperature = 0.0
        eos = self.tokenizer.eos_token_id
        with torch.no_grad():
            return self._model.generate(
                context.to(self.device), max_length - context.size(1), temperature=temperature,
                top_k=kwargs.get("top_k"), top_p=float(kwargs.get("top_p") or 1.0),
                eos_id=[eos] if eos is not None else None, prompt_lengths=lengths,
            )  # fmt: skip
