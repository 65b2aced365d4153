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

Under several ranks (the in-loop evaluation, trainer/evaluation/inloop.py) each rank gets its share of
the documents from lm_eval and the results are gathered on rank 0 (lm_eval's own multi-rank path:
`rank`, `world_size`, `all_gather`, `gather_object`, `barrier`). A sharded model (FSDP2, ZeRO-3)
needs every rank in every forward, but the ranks' shares take different numbers of forwards (batches
of different lengths, generations ending at different tokens), so the forwards go in lockstep
(`Lockstep`): before each forward every rank says whether it has one to run, and a rank done with its
share runs a one-token forward for each forward another rank still runs, as torch's `Join` does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import configure_pad_token

from trainer.parallel.dist import collective


class Lockstep:
    """Pairs every rank's forwards of `model` while ranks run different numbers of them (a sharded
    model's forward is collective). A hook placed before the model's own (FSDP's, DeepSpeed's) votes 1
    on every forward; `drain()`, called by a rank with nothing left to run, votes 0 and runs a
    one-token forward for as long as another rank still votes 1. Every rank drains at the end of
    each request type, so they all leave together."""

    def __init__(self, model: torch.nn.Module, device: torch.device, autocast: Callable[[], Any]) -> None:
        self.model, self.device, self.autocast = model, device, autocast
        self.draining = False
        self.handle = model.register_forward_pre_hook(self._arrive, prepend=True)

    def _vote(self, running: int) -> int:
        flag = torch.tensor([running], device=self.device)
        with collective("all_reduce (evaluation forwards in lockstep)"):
            dist.all_reduce(flag)  # collective
        return int(flag.item())

    def _arrive(self, module: torch.nn.Module, args: Any) -> None:
        if not self.draining:
            self._vote(1)

    def drain(self) -> int:
        """Run one-token forwards until no rank has a forward left; returns how many this rank ran."""
        self.draining, runs = True, 0
        try:
            token = torch.zeros(1, 1, dtype=torch.long, device=self.device)
            while self._vote(0) > 0:
                with torch.no_grad(), self.autocast():
                    self.model(token)
                runs += 1
        finally:
            self.draining = False
        return runs

    def close(self) -> None:
        self.handle.remove()


class HarnessLM(HFLM):
    """lm_eval's HFLM over a harness GPT (trainer.model.gpt) and a Hugging Face tokenizer."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, *, batch_size: int = 1, max_length: int | None = None,
                 device: str | torch.device = "cpu", name: str = "trainer", rank: int = 0, world_size: int = 1,
                 autocast: Callable[[], Any] | None = None, quiet: bool = False, group: Any = None,
                 lockstep: bool | None = None) -> None:  # fmt: skip
        """model: a harness GPT (under several ranks every rank's copy, sharded or not: all take part);
        autocast: a context factory every model call runs under (the training precision; None: fp32);
        quiet: no progress bars (the in-loop evaluation). rank / world_size: this rank's share of the
        documents, among the data-parallel ranks of `group` (None: every rank; under tensor parallelism
        the peers of a tensor group take the same share and gather within their own data-parallel group);
        lockstep: join the forwards of every rank (default: world_size > 1; tensor parallelism with data
        parallelism needs it even where its group holds one rank)."""
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
        self._rank, self._world_size = rank, world_size
        self.autocast = autocast or contextlib.nullcontext
        self.quiet = quiet
        self.group = group
        lockstep = world_size > 1 if lockstep is None else lockstep
        self.lockstep = Lockstep(model, self._device, self.autocast) if lockstep else None

    def close(self) -> None:
        """Remove the lockstep hook (the model trains on without it)."""
        if self.lockstep is not None:
            self.lockstep.close()

    # -- lm_eval's multi-rank interface, over torch.distributed's default group ----------------------------
    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size <= 1:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        with collective("all_gather (evaluation request counts)"):
            dist.all_gather(parts, tensor, group=self.group)  # collective
        return torch.stack(parts) if tensor.dim() == 0 else torch.cat(parts)

    def gather_object(self, obj: Any, dst: int = 0) -> list[Any] | None:
        """Every rank's obj on dst. lm_eval gathers {task: {(metric, filter): per-document values}} and
        chains the ranks' lists; rank r holds documents r, r + W, r + 2W, ... so those lists come back
        interleaved as one: the single process's document order (corpus-level metrics and bootstrap
        stderrs, which resample by position, then equal a single process's too)."""
        if self.world_size <= 1:
            return [obj]
        gathered: list[Any] = [None] * self.world_size
        with collective("all_gather_object (evaluation results)"):
            dist.all_gather_object(gathered, obj, group=self.group)  # collective (all_gather: gloo and NCCL alike)
        if self.rank != dst:
            return None
        return [interleaved(gathered)] if all(per_document(g) for g in gathered) else gathered

    def barrier(self) -> None:
        if self.world_size > 1:
            with collective("barrier (evaluation)"):
                dist.barrier()  # collective

    # -- each request type: this rank's share, then the lockstep drain -------------------------------------
    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list:
        return self._drained(super().loglikelihood(requests, disable_tqdm=disable_tqdm or self.quiet))

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list:
        return self._drained(super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm or self.quiet))

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list:
        return self._drained(super().generate_until(requests, disable_tqdm=disable_tqdm or self.quiet))

    def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False, override_bs: int | None = None) -> list:
        return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm or self.quiet, override_bs=override_bs)

    def _drained(self, responses: list) -> list:
        if self.lockstep is not None:
            self.lockstep.drain()
        return responses

    @property
    def model(self) -> torch.nn.Module:
        return self._model

    def _model_call(self, inps: torch.Tensor, attn_mask: Any = None, labels: Any = None) -> torch.Tensor:
        """Logits (B, T, vocab) of rows padded on the right (causal: padding never reaches a real token)."""
        with torch.no_grad(), self.autocast():
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
        with torch.no_grad(), self.autocast():
            return self._model.generate(
                context.to(self.device), max_length - context.size(1), temperature=temperature,
                top_k=kwargs.get("top_k"), top_p=float(kwargs.get("top_p") or 1.0),
                eos_id=[eos] if eos is not None else None, prompt_lengths=lengths,
                stopped=self._stop_check(stop, context.size(1)),
            )  # fmt: skip

    def _stop_check(self, stop: list[str], width: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
        """The rows whose generated text (after the `width` context columns) holds a stop string: HFLM
        cuts every reply at its first stop string, so nothing generated after one changes the answer
        and the row can end there (as lm_eval's `hf` model's stopping criteria end it)."""
        if not stop:
            return None

        def stopped(idx: torch.Tensor, done: torch.Tensor) -> torch.Tensor:
            hit = done.clone().cpu()
            for row in torch.nonzero(~hit).flatten().tolist():
                text = self.tok_decode(idx[row, width:].tolist(), skip_special_tokens=False)
                hit[row] = any(s in text for s in stop)
            return hit

        return stopped


def per_document(obj: Any) -> bool:
    """Whether obj is lm_eval's {task: {metric key: [a value per document]}}."""
    return isinstance(obj, dict) and all(
        isinstance(v, dict) and all(isinstance(values, list) for values in v.values()) for v in obj.values()
    )


def interleaved(ranks: list[dict]) -> dict:
    """The ranks' per-document lists merged round-robin (rank r's k-th value is document r + k * W)."""
    merged: dict = {}
    for task in ranks[0]:
        merged[task] = {}
        for key in ranks[0][task]:
            lists = [r.get(task, {}).get(key, []) for r in ranks]
            merged[task][key] = [v for k in range(max(map(len, lists))) for v in (ls[k] for ls in lists if k < len(ls))]
    return merged
