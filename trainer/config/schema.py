"""The schemas: typed dataclasses that Hydra validates every YAML and override against.

Each field is a config key (`train.max_steps`, `model.n_head`, ...). `__post_init__` checks one
section at a time; rules that span sections and components are in trainer/preflight.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore


class ConfigError(ValueError):
    """A config value that cannot work. Its message is one line naming the key and the fix."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


AUTO_CHUNK_VOCAB = 2048  # model.loss_chunk_size=null: fuse head and loss from this (padded) vocabulary up
AUTO_CHUNK_TOKENS = 1024  # ... in chunks of this many tokens
# Hugging Face model_types GPT imports and exports: one module each in trainer/model/families.
MODEL_TYPES = (
    "gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "gemma3", "phi3", "olmo2", "mixtral",
    "qwen3_moe",
)  # fmt: skip


@dataclass
class ModelConfig:
    """A GPT-style decoder. The options let GPT-2 and Llama-family checkpoints share one class."""

    name: str = "tiny"  # a label for logs and wandb (the model group's name)
    vocab_size: int | None = None  # the real vocabulary (forward's logits); None: the tokenizer's
    # embedding / head rows: vocab_size rounded up to a multiple of this, so the head's matmuls run at aligned
    # sizes; the padding rows' logits are masked (-inf) in the loss and cut from forward's logits. 1: no padding
    vocab_multiple: int = 64
    block_size: int = 256  # longest context the model supports (learned positions / RoPE table)
    n_layer: int = 4  # transformer blocks
    n_head: int = 4  # attention (query) heads
    n_kv_head: int | None = None  # grouped-query attention; None means n_head (plain multi-head)
    n_embd: int = 128  # width of the residual stream
    intermediate_size: int | None = None  # MLP width; None means 4 * n_embd
    norm: str = "layernorm"  # layernorm | rmsnorm
    norm_eps: float = 1e-5  # epsilon of LayerNorm / RMSNorm
    # gelu (tanh approximation, as GPT-2) | gelu_exact (erf, as nanoGPT) | swiglu (as Llama) | geglu (tanh GELU gate: Gemma)
    mlp: str = "gelu"
    position: str = "learned"  # learned | rope
    rope_theta: float = 10000.0  # RoPE base frequency
    rope_scaling: dict[str, Any] | None = None  # Llama 3 'llama3' scaling, as in HF config.json
    tie_embeddings: bool = True  # the head shares the token embedding's weight (GPT-2); False: its own (Llama 3 8B)
    bias: bool = True  # biases in linear layers and LayerNorm
    qkv_bias: bool | None = None  # biases on the q / k / v projection (Qwen2: true with bias false); None follows bias
    dropout: float = 0.0  # on attention probabilities and residual branches (0 for pretraining at scale)
    attention_backend: str = "auto"  # auto | flash | efficient | cudnn | math | flash_attn (Dao's package)
    init_std: float = 0.02  # std of the normal init of weights (residual projections scaled by 1 / sqrt(2 n_layer))
    pretrained: str | None = None  # local Hugging Face checkpoint directory (see PRETRAINED_OVERRIDABLE)
    activation_checkpointing: str = "none"  # none | full (whole blocks) | attention | mlp (selective)
    activation_checkpointing_every: int = 1  # checkpoint every k-th block (blocks 0, k, 2k, ...)
    loss_chunk_size: int | None = (
        None  # >0: head + cross-entropy fused over chunks of N tokens; 0: full logits; null: auto
    )
    # Attention that slides: a local layer's query reads only the last sliding_window keys (itself included).
    sliding_window: int | None = None  # the window; null: every layer attends to its whole context
    # per layer "full_attention" | "sliding_attention" (Hugging Face's key); null with a window: every layer slides
    layer_types: list[str] | None = None
    rope_local_theta: float | None = None  # Gemma 3: the sliding layers' RoPE base (no scaling); null: rope_theta
    head_dim: int | None = None  # attention head size; null: n_embd / n_head (Qwen3 and Gemma set their own)
    qk_norm: str = "none"  # none | head (RMSNorm over each head's q and k: Qwen3, Gemma 3) | full (OLMo 2)
    # pre: x + f(norm(x)) | post: x + norm(f(x)) (OLMo 2) | sandwich: x + norm(f(norm(x))) (Gemma 2 / 3)
    norm_placement: str = "pre"
    norm_offset: float = 0.0  # RMSNorm scales by (offset + weight): Gemma's 1 (its weights start at 0)
    embed_scale: bool = False  # embeddings times sqrt(n_embd) (Gemma)
    query_pre_attn_scalar: float | None = None  # attention scores scaled by its -1/2 power; null: head_dim's
    attn_softcap: float | None = None  # scores -> c tanh(scores / c) before the softmax (Gemma 2)
    final_softcap: float | None = None  # logits -> c tanh(logits / c) (Gemma 2)
    fused_gate_up: bool = False  # swiglu / geglu: gate and up in one linear [gate | up] (Phi-3's gate_up_proj)
    # Mixture of experts: n_experts > 0 makes the MLP of the layers moe_layers names (null: all) a sparse MLP
    n_experts: int = 0  # experts per sparse MLP; 0: dense
    n_experts_per_token: int = 2  # top-k experts each token is routed to
    moe_intermediate_size: int | None = None  # an expert's width; null: intermediate_size
    moe_norm_topk: bool = True  # renormalise the top-k routing weights to sum 1 (Mixtral; Qwen3-MoE's norm_topk_prob)
    router_aux_loss_coef: float = 0.0  # weight of the load-balancing loss added to the step's loss
    moe_layers: list[int] | None = None  # the blocks with a sparse MLP; null: every block
    moe_impl: str = "auto"  # auto | grouped (torch._grouped_mm) | loop (one matmul per expert over its sorted tokens)
    hf_model_type: str | None = None  # the HF architecture (trainer.model.families); None: from the layout

    def __post_init__(self) -> None:
        for key in ("n_layer", "n_head", "n_embd", "block_size"):
            _require(getattr(self, key) > 0, f"model.{key} must be positive, got {getattr(self, key)}")
        _require(
            self.head_dim is not None or self.n_embd % self.n_head == 0,
            f"model.n_head={self.n_head} does not divide model.n_embd={self.n_embd}: "
            "choose n_head so that n_embd / n_head is a whole head size",
        )
        kv = self.n_kv_head or self.n_head
        _require(
            self.n_head % kv == 0,
            f"model.n_kv_head={kv} does not divide model.n_head={self.n_head}: "
            "each key/value head must serve a whole number of query heads",
        )
        _require(self.norm in ("layernorm", "rmsnorm"), f"model.norm={self.norm!r}: use layernorm or rmsnorm")
        _require(
            self.mlp in ("gelu", "gelu_exact", "swiglu", "geglu"),
            f"model.mlp={self.mlp!r}: use gelu, gelu_exact, swiglu or geglu",
        )
        _require(self.position in ("learned", "rope"), f"model.position={self.position!r}: use learned or rope")
        _require(
            self.attention_backend in ("auto", "flash", "efficient", "cudnn", "math", "flash_attn"),
            f"model.attention_backend={self.attention_backend!r}: use auto, flash, efficient, cudnn, math or flash_attn",
        )
        _require(
            self.vocab_size is None or self.vocab_size > 0,
            f"model.vocab_size must be positive or null, got {self.vocab_size}",
        )
        _require(
            self.vocab_multiple > 0,
            f"model.vocab_multiple must be positive (1 turns vocabulary padding off), got {self.vocab_multiple}",
        )
        _require(0.0 <= self.dropout < 1.0, f"model.dropout={self.dropout} must be in [0, 1)")
        _require(
            self.activation_checkpointing in ("none", "full", "attention", "mlp"),
            f"model.activation_checkpointing={self.activation_checkpointing!r}: use none, full, attention or mlp",
        )
        _require(  # with model.pretrained, against the checkpoint's depth (when the config is resolved)
            1 <= self.activation_checkpointing_every
            and (bool(self.pretrained) or self.activation_checkpointing_every <= self.n_layer),
            f"model.activation_checkpointing_every={self.activation_checkpointing_every} must be between 1 and "
            f"the depth model.n_layer={self.n_layer}",
        )
        _require(
            self.loss_chunk_size is None or self.loss_chunk_size >= 0,
            f"model.loss_chunk_size must be >= 0 (0: full logits) or null (auto), got {self.loss_chunk_size}",
        )
        _require(
            self.sliding_window is None or self.sliding_window > 0,
            f"model.sliding_window must be positive or null, got {self.sliding_window}",
        )
        _require(
            self.hf_model_type is None or self.hf_model_type in MODEL_TYPES,
            f"model.hf_model_type={self.hf_model_type!r}: use one of {', '.join(MODEL_TYPES)} or null",
        )
        self._check_families()

    def _check_families(self) -> None:
        """The switches later families (Qwen3, Gemma, Phi-3, OLMo 2, MoE) add: values that exist."""
        _require(self.head_dim is None or self.head_dim > 0, f"model.head_dim must be positive, got {self.head_dim}")
        _require(
            self.position != "rope" or self.attn_head_dim % 2 == 0,
            f"model.position=rope needs an even head size, got {self.attn_head_dim}",
        )
        _require(self.qk_norm in ("none", "head", "full"), f"model.qk_norm={self.qk_norm!r}: use none, head or full")
        _require(
            self.norm_placement in ("pre", "post", "sandwich"),
            f"model.norm_placement={self.norm_placement!r}: use pre, post or sandwich",
        )
        _require(
            self.layer_types is None or len(self.layer_types) == self.n_layer,
            f"model.layer_types has {len(self.layer_types or [])} entries; it needs one per layer (n_layer={self.n_layer})",
        )
        bad = sorted(set(self.layer_types or []) - {"full_attention", "sliding_attention"})
        _require(not bad, f"model.layer_types holds {bad}: use full_attention or sliding_attention")
        _require(
            not (self.layer_types and "sliding_attention" in self.layer_types and self.sliding_window is None),
            "model.layer_types has sliding_attention layers but model.sliding_window is null: set the window",
        )
        for key in ("attn_softcap", "final_softcap", "query_pre_attn_scalar"):
            value = getattr(self, key)
            _require(value is None or value > 0, f"model.{key} must be positive or null, got {value}")
        _require(self.n_experts >= 0, f"model.n_experts must be >= 0 (0: dense), got {self.n_experts}")
        if self.n_experts:
            _require(
                1 <= self.n_experts_per_token <= self.n_experts,
                f"model.n_experts_per_token={self.n_experts_per_token} must be between 1 and "
                f"model.n_experts={self.n_experts}",
            )
            bad_layers = [i for i in self.moe_layers or [] if not 0 <= i < self.n_layer]
            _require(not bad_layers, f"model.moe_layers {bad_layers} are not blocks of a {self.n_layer}-layer model")
        _require(
            self.moe_impl in ("auto", "grouped", "loop"), f"model.moe_impl={self.moe_impl!r}: use auto, grouped or loop"
        )
        _require(self.router_aux_loss_coef >= 0, "model.router_aux_loss_coef must be >= 0")

    def check_gated(self) -> None:
        """The switches that need a gated MLP (checked once the whole model config is known, when
        GPT is built: a checkpoint's mlp may come with it)."""
        _require(
            not (self.fused_gate_up or self.n_experts) or self.mlp in ("swiglu", "geglu"),
            f"model.fused_gate_up / model.n_experts need a gated MLP, got model.mlp={self.mlp}: "
            "use model.mlp=swiglu or geglu",
        )

    @property
    def attn_head_dim(self) -> int:
        """The attention head size: model.head_dim, else n_embd / n_head."""
        return self.head_dim or self.n_embd // self.n_head

    def is_sliding(self, layer: int) -> bool:
        """Whether block `layer` attends within model.sliding_window (layer_types; without them, every
        layer when a window is set)."""
        if self.sliding_window is None:
            return False
        return self.layer_types is None or self.layer_types[layer] == "sliding_attention"

    def is_moe(self, layer: int) -> bool:
        """Whether block `layer` has a sparse (mixture-of-experts) MLP."""
        return self.n_experts > 0 and (self.moe_layers is None or layer in self.moe_layers)

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding and the head: vocab_size rounded up to a multiple of vocab_multiple.
        The rows past vocab_size are padding: no token has them, their logits are masked."""
        if self.vocab_size is None:
            raise ValueError("model.vocab_size is null: resolve it from the tokenizer first")
        return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple

    @property
    def loss_chunk(self) -> int:
        """Tokens per chunk of the fused head + cross-entropy; 0 means full logits.

        model.loss_chunk_size=null (the default) picks: chunks of AUTO_CHUNK_TOKENS once the padded
        vocabulary reaches AUTO_CHUNK_VOCAB, full logits below. `python -m benchmarks.loss` on the
        2-core CPU (2048 tokens, fp32, forward + backward) measured chunks of 1024 faster and smaller
        from V = 4096 (C = 128: 0.04 s vs 0.22 s, 0.24x the memory; V = 50304, C = 768: 2.4 s vs
        6.3 s, 0.32x) and no different at V = 320 (0.01 s either way)."""
        if self.loss_chunk_size is not None:
            return self.loss_chunk_size
        vocab = self.padded_vocab_size if self.vocab_size is not None else 0
        return AUTO_CHUNK_TOKENS if vocab >= AUTO_CHUNK_VOCAB else 0


# ModelConfig fields that may be set together with model.pretrained; every other field is the
# checkpoint's architecture (setting it is refused unless it agrees with the checkpoint).
PRETRAINED_OVERRIDABLE = (
    "name",
    "pretrained",
    "block_size",  # a smaller context (learned positions are cropped); never a larger one
    "dropout",
    "attention_backend",
    "activation_checkpointing",
    "activation_checkpointing_every",
    "loss_chunk_size",
    "moe_impl",  # how the experts' matmuls run, not what they compute
    "vocab_multiple",  # the padding of the checkpoint's vocabulary (imported with zero rows, exported without)
)


@dataclass
class DataConfig:
    """Where text or records come from and how they become token sequences (and, for fine-tuning
    records, which tokens count toward the loss)."""

    source: str = "stdlib"  # stdlib | files | hf | synthetic | shards (made by python -m trainer.data.prepare)
    # files / hf: a .jsonl/.json/.parquet/.csv/.txt file, a glob (/data/part-*.jsonl), a directory or a
    # Dataset.save_to_disk folder; hf also a dataset name; shards: the directory prepare wrote
    path: str | None = None
    # shards: several shard directories sampled by weight, [{name: web, path: DIR, weight: 0.7}, ...] (instead
    # of data.path); tokens drawn from each are logged as data/tokens/<name>
    mixture: list[dict[str, Any]] = field(default_factory=list)
    hf_config: str | None = None  # hf: the dataset's configuration name
    hf_split: str = "train"  # hf: the dataset split to read
    text_field: str = "text"  # text format, records with fields (.jsonl/.json/.parquet/.csv, hf): the text
    streaming: bool = False  # text: tokenize as training reads (no cache, no pass ahead); hf: an IterableDataset
    max_documents: int | None = None  # cap on documents read (useful with streaming)
    # files: a directory's files with these suffixes are read (a single file or a glob: any suffix)
    extensions: list[str] = field(default_factory=lambda: [".txt", ".md", ".py", ".jsonl", ".json", ".parquet"])
    # null (auto): model.pretrained's own tokenizer when set, else byte (stdlib, instruct) or bpe (files, hf);
    # byte | bpe | a local Hugging Face tokenizer directory
    tokenizer: str | None = None
    bpe_vocab_size: int = 4096  # a BPE tokenizer trained on the data (data.tokenizer=bpe): its vocabulary size
    cache_dir: str = "~/.cache/trainer"  # token and example caches live here, keyed by (source, tokenizer, format)
    val_fraction: float = 0.02  # share held out for validation: of the token stream (text) or of the examples
    # text: documents joined by the tokenizer's eos | instruct: prompt -> response records | chat: conversations
    format: str = "text"
    prompt_field: str = "prompt"  # instruct: the record field holding the prompt
    response_field: str = "response"  # instruct: the record field holding the response
    messages_field: str = "messages"  # chat: the field holding [{role, content}, ...] (system/user/assistant/tool)
    chat_template: bool = False  # instruct: render the prompt as a user turn of the tokenizer's chat template
    train_on_prompt: bool = False  # instruct: the prompt's tokens count toward the loss too (else response + eos)
    packing: bool = True  # instruct / chat: whole examples packed into rows of seq_len (else one per row, padded)
    document_mask: bool = True  # instruct / chat: batches carry positions so attention stays within an example
    # instruct / chat / preference / prompts: fail (an error naming file and line) | skip (counted, reported)
    on_bad_record: str = "fail"
    chosen_field: str = "chosen"  # preference: the preferred completion (a string, or a message list)
    rejected_field: str = "rejected"  # preference: the other completion (a string, or a message list)
    # preference: a pair longer than train.seq_len keeps its start (the completions' ends are cut) or its
    # end (the prompt's start is cut); a pair whose completion is cut away entirely is skipped (counted) or refused
    truncation: str = "keep_start"
    synthetic_vocab: int = 32  # synthetic: Markov chain alphabet size
    synthetic_tokens: int = 200_000  # synthetic: stream length
    synthetic_concentration: float = 0.3  # synthetic: Dirichlet concentration of transition rows
    prefetch: bool = True  # read the next batch on a background thread while this one trains (pinned on CUDA)

    def __post_init__(self) -> None:
        _require(
            self.source in ("stdlib", "files", "hf", "synthetic", "shards"),
            f"data.source={self.source!r}: use stdlib, files, hf, synthetic or shards",
        )
        _require(
            self.source not in ("files", "hf") or bool(self.path),
            f"data.source={self.source} needs data.path=<file, glob, directory or dataset>",
        )
        _require(0.0 < self.val_fraction < 0.5, f"data.val_fraction={self.val_fraction} must be in (0, 0.5)")
        _require(
            self.format in ("text", "instruct", "chat", "preference", "prompts"),
            f"data.format={self.format!r}: use text, instruct, chat, preference or prompts",
        )
        _require(
            self.truncation in ("keep_start", "keep_end"),
            f"data.truncation={self.truncation!r}: use keep_start or keep_end",
        )
        _require(
            self.format == "text" or self.source in ("files", "hf"),
            f"data.format={self.format} reads records from data.path: use data={self.format} "
            f"(or data.source=files / hf with data.path=...), not data.source={self.source}",
        )
        _require(self.on_bad_record in ("fail", "skip"), f"data.on_bad_record={self.on_bad_record!r}: use fail or skip")
        _require(self.bpe_vocab_size >= 260, f"data.bpe_vocab_size={self.bpe_vocab_size} must be at least 260")
        _require(self.synthetic_vocab >= 2, "data.synthetic_vocab must be at least 2")
        _require(
            self.synthetic_concentration > 0,
            f"data.synthetic_concentration={self.synthetic_concentration} must be positive",
        )
        _require(self.synthetic_tokens > 0, f"data.synthetic_tokens={self.synthetic_tokens} must be positive")
        self._check_shards()

    def _check_shards(self) -> None:
        """data=shards: text windows, data.path or data.mixture (named, positive weights), not streamed."""
        _require(
            not self.mixture or self.source == "shards",
            "data.mixture samples shard directories: use data=shards (make them with python -m trainer.data.prepare)",
        )
        if self.source != "shards":
            return
        _require(self.format == "text", f"data=shards holds token windows, not data.format={self.format} records")
        _require(not self.streaming, "data=shards reads finished shards: drop data.streaming")
        _require(not (self.path and self.mixture), "data=shards reads data.path or data.mixture, not both: drop one")
        names = []
        for entry in self.mixture:
            _require(
                isinstance(entry, dict) and set(entry) == {"name", "path", "weight"},
                f"data.mixture entry {entry}: each source is {{name: NAME, path: DIR, weight: W}}",
            )
            name, weight = str(entry["name"]), entry["weight"]
            _require(bool(name) and "/" not in name, f"data.mixture name {name!r}: a non-empty name without '/'")
            _require(name not in names, f"data.mixture names {name!r} twice: give each source its own name")
            _require(
                isinstance(weight, int | float) and not isinstance(weight, bool) and weight > 0,
                f"data.mixture source {name!r}: weight={weight} must be a number > 0",
            )
            names.append(name)


@dataclass
class OptimConfig:
    """AdamW with decay / no-decay groups and a warmup + cosine schedule."""

    name: str = "adamw"  # the optimizer (AdamW)
    lr: float = 1e-3  # peak learning rate (after warmup)
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio
    weight_decay: float = 0.1  # applied to matrices (linear and embedding weights), not to biases or norms
    beta1: float = 0.9  # AdamW's first-moment decay
    beta2: float = 0.95  # AdamW's second-moment decay
    eps: float = 1e-8  # AdamW's epsilon
    warmup_steps: int = 20  # linear warmup from 0 to optim.lr
    schedule: str = "cosine"  # cosine | constant
    clip_grad_norm: float = 1.0  # 0 disables clipping (the norm is still measured)

    def __post_init__(self) -> None:
        _require(self.name == "adamw", f"optim.name={self.name!r}: only adamw is available")
        _require(self.lr > 0, f"optim.lr must be positive, got {self.lr}")
        _require(self.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        _require(self.schedule in ("cosine", "constant"), f"optim.schedule={self.schedule!r}: use cosine or constant")
        _require(self.clip_grad_norm >= 0, f"optim.clip_grad_norm must be >= 0, got {self.clip_grad_norm}")
        _require(0.0 <= self.min_lr_ratio <= 1.0, f"optim.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")


STRATEGIES = ("none", "ddp", "fsdp", "zero1", "zero2", "zero3")


@dataclass
class ParallelConfig:
    """How the model and optimizer are spread over ranks (torchrun sets the ranks)."""

    strategy: str = "none"  # none | ddp | fsdp (PyTorch FSDP2) | zero1 | zero2 | zero3 (DeepSpeed)
    timeout_s: float = 600.0  # bound on every collective: a dead rank ends the job, never hangs it
    fsdp_reshard_after_forward: bool = True  # free gathered weights after forward (ZeRO-3-like); False: ZeRO-2-like
    fsdp_cpu_offload: bool = False  # keep sharded parameters, gradients and optimizer state in CPU memory
    fsdp_shard_size: int = 0  # hybrid sharding: shard within groups of this many ranks, replicate across (0: all)
    # HSDP: replicate the fsdp shards across this many groups (shard within each: world size / replicate
    # ranks); the device mesh (replicate, shard). On several nodes, the node count (the launch scripts)
    replicate: int = 1
    # tensor + sequence parallelism: each layer split over this many ranks (the innermost mesh dimension:
    # keep it within a node), with parallel=fsdp (shards over the rest) or parallel=none (alone)
    tensor: int = 1
    fsdp_prefetch: int = 1  # blocks whose all-gather is issued ahead (forward and backward); 1: FSDP2's own default
    zero_offload_optimizer: bool = False  # DeepSpeed: optimizer state and step on the CPU
    zero_offload_params: bool = False  # DeepSpeed zero3: parameters on the CPU between uses
    deepspeed_config: str | None = None  # a DeepSpeed JSON of your own; the harness's keys must agree with it
    expert: int = 1  # expert parallelism: each rank of a group of this many holds 1/expert of each MoE layer's experts

    def __post_init__(self) -> None:
        _require(
            self.strategy in STRATEGIES,
            f"parallel.strategy={self.strategy!r}: use one of {', '.join(STRATEGIES)}",
        )
        _require(self.timeout_s > 0, f"parallel.timeout_s must be positive, got {self.timeout_s}")
        _require(self.fsdp_shard_size >= 0, f"parallel.fsdp_shard_size must be >= 0, got {self.fsdp_shard_size}")
        _require(self.expert >= 1, f"parallel.expert must be >= 1 (1: no expert parallelism), got {self.expert}")
        _require(self.replicate >= 1, f"parallel.replicate must be >= 1 (1: no replication), got {self.replicate}")
        _require(self.tensor >= 1, f"parallel.tensor must be >= 1 (1: no tensor parallelism), got {self.tensor}")
        _require(
            self.tensor == 1 or self.strategy in ("none", "fsdp"),
            f"parallel.tensor={self.tensor} composes with parallel=fsdp (or runs alone with parallel=none), not "
            f"parallel={self.strategy}: use parallel=fsdp parallel.tensor={self.tensor}",
        )
        _require(self.fsdp_prefetch >= 1, f"parallel.fsdp_prefetch must be >= 1, got {self.fsdp_prefetch}")
        _require(
            not self.zero_offload_params or self.strategy == "zero3",
            "parallel.zero_offload_params needs parallel=zero3 (ZeRO-1/2 do not partition parameters)",
        )
        _require(
            not (self.deepspeed_config or self.zero_offload_optimizer) or self.strategy.startswith("zero"),
            "parallel.deepspeed_config and parallel.zero_offload_optimizer need parallel=zero1, zero2 or zero3",
        )


@dataclass
class PrecisionConfig:
    """Numeric format of forward / backward. Master weights and optimizer state stay fp32."""

    dtype: str = "fp32"  # fp32 | bf16 | fp16 (autocast)
    loss_scaling: bool = False  # dynamic loss scaling; always on for fp16, optional for bf16
    initial_scale: float = 65536.0  # 2**16
    growth_interval: int = 2000  # steps without inf/NaN before the scale grows
    growth_factor: float = 2.0  # the scale is multiplied by this after growth_interval clean steps
    backoff_factor: float = 0.5  # the scale is multiplied by this after a step with inf/NaN gradients

    def __post_init__(self) -> None:
        _require(self.dtype in ("fp32", "bf16", "fp16"), f"precision.dtype={self.dtype!r}: use fp32, bf16 or fp16")
        _require(self.initial_scale > 0, f"precision.initial_scale must be positive, got {self.initial_scale}")
        _require(self.growth_interval > 0, f"precision.growth_interval must be positive, got {self.growth_interval}")
        _require(self.growth_factor > 1, f"precision.growth_factor must be > 1, got {self.growth_factor}")
        _require(0 < self.backoff_factor < 1, f"precision.backoff_factor must be in (0, 1), got {self.backoff_factor}")
        _require(
            not self.loss_scaling or self.dtype != "fp32",
            "precision.loss_scaling=true needs precision=bf16 or fp16 (fp32 gradients do not underflow)",
        )

    @property
    def scaled(self) -> bool:
        """Whether a dynamic loss scaler runs (fp16 always; bf16 when asked)."""
        return self.dtype == "fp16" or self.loss_scaling


@dataclass
class LoraConfig:
    """Low-rank adapters (LoRA / DoRA / QLoRA) on the targeted linear layers; off by default.

    Module names are Hugging Face's, so adapters map one-to-one onto PEFT's: Llama-family
    q_proj k_proj v_proj o_proj gate_proj up_proj down_proj, GPT-2 c_attn c_proj c_fc, or all-linear.
    Mixture-of-experts: the checkpoint's expert names (Mixtral w1 w3 w2, Qwen3-MoE gate_proj up_proj
    down_proj) and the router `gate`, or target_parameters; see trainer/lora/experts.py.
    """

    enabled: bool = False  # lora=default sets it: adapters train, the base is frozen
    r: int = 16  # rank of each adapter
    alpha: float = 32.0  # scale = alpha / r (alpha / sqrt(r) with rslora)
    dropout: float = 0.0  # on the adapter's input
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])  # HF module names, or all-linear
    # PEFT's target_parameters: transformers 5's fused experts, e.g. [mlp.experts.gate_up_proj, mlp.experts.down_proj]
    target_parameters: list[str] = field(default_factory=list)
    rslora: bool = False  # rank-stabilised scale alpha / sqrt(r)
    dora: bool = False  # weight-decomposed LoRA: a trained magnitude per output row
    train_modules: list[str] = field(default_factory=list)  # trained in full, e.g. [norm] or [lm_head]
    base_dtype: str = "bf16"  # bf16 | fp32: the frozen base's storage (adapters and their state are fp32)
    quantize_base: str | None = None  # nf4: QLoRA, the frozen base stored in 4-bit NormalFloat
    init_from: str | None = None  # a PEFT adapter directory to start from (continue training it)
    seed: int | None = None  # adapters' init seed; null: train.seed

    def __post_init__(self) -> None:
        _require(self.r > 0, f"lora.r={self.r} must be positive")
        _require(self.alpha > 0, f"lora.alpha={self.alpha} must be positive")
        _require(0.0 <= self.dropout < 1.0, f"lora.dropout={self.dropout} must be in [0, 1)")
        _require(self.base_dtype in ("bf16", "fp32"), f"lora.base_dtype={self.base_dtype!r}: use bf16 or fp32")
        _require(self.quantize_base in (None, "nf4"), f"lora.quantize_base={self.quantize_base!r}: use null or nf4")
        _require(
            bool(self.target_modules or self.target_parameters),
            "lora.target_modules is empty: name modules (q_proj ...) or all-linear",
        )


@dataclass
class ObjectiveConfig:
    """What a step minimises (trainer/objectives/): sft (next-token loss; the default), dpo (preference
    pairs, data=preference), grpo / rloo (sampled completions scored by reward functions, data=prompts).
    The reference model is the base with the adapters off under LoRA, else a frozen copy sharded like
    the policy, or log-probs computed once before training (precompute_reference)."""

    name: str = "sft"  # sft | dpo | grpo | rloo
    beta: float = 0.1  # dpo: the preference temperature; grpo / rloo: the KL coefficient (0: no reference)
    # dpo
    loss: str = "sigmoid"  # dpo: sigmoid | ipo (length-averaged) | hinge | robust
    # dpo robust, and sigmoid (conservative DPO; TRL 1.16's sigmoid ignores it): the share of flipped labels
    label_smoothing: float = 0.0
    precompute_reference: bool = False  # dpo: reference log-probs in one pass before training, kept with the data cache
    # grpo / rloo
    loss_type: str = "dapo"  # grpo: grpo (per-sequence mean) | dr_grpo (/ max_new_tokens) | dapo (per token)
    num_generations: int = 8  # completions sampled per prompt (the group); train.micro_batch_size counts prompts
    max_new_tokens: int = 256  # the longest completion
    temperature: float = 1.0  # sampling temperature of the generations
    top_p: float = 1.0  # nucleus sampling: the smallest set of tokens holding this much probability
    top_k: int = 0  # sample among the k likeliest tokens (0: all)
    rewards: list[str] = field(default_factory=list)  # FILE.py:function, pkg.module:function or a built-in
    reward_weights: list[float] | None = None  # one per reward function (null: all 1)
    scale_rewards: str = (
        "group"  # grpo: advantages divided by the group's std (group), the batch's (batch), or not (none)
    )
    epsilon: float = 0.2  # the clipped ratio's lower bound 1 - epsilon
    epsilon_high: float | None = None  # its upper bound 1 + epsilon_high (null: epsilon; DAPO uses 0.28)
    iterations: int = 1  # optimizer steps on each batch of generations (the ratio moves away from 1 after the first)

    def __post_init__(self) -> None:
        _require(self.name in OBJECTIVES, f"objective={self.name!r} is not an objective: use {', '.join(OBJECTIVES)}")
        _require(self.loss in DPO_LOSSES, f"objective.loss={self.loss!r}: use {', '.join(DPO_LOSSES)}")
        _require(self.loss_type in GRPO_LOSSES, f"objective.loss_type={self.loss_type!r}: use {', '.join(GRPO_LOSSES)}")
        _require(self.beta >= 0, f"objective.beta={self.beta} must be >= 0")
        _require(self.name != "dpo" or self.beta > 0, "objective.beta must be positive for dpo (0.1 is usual)")
        _require(
            0.0 <= self.label_smoothing < 0.5, f"objective.label_smoothing={self.label_smoothing} must be in [0, 0.5)"
        )
        _require(
            self.name not in ("grpo", "rloo") or self.num_generations >= 2,
            f"objective.num_generations={self.num_generations}: {self.name} compares the completions of one "
            "prompt with each other, so it needs at least 2 (8 is usual)",
        )
        _require(self.max_new_tokens > 0, f"objective.max_new_tokens must be positive, got {self.max_new_tokens}")
        _require(self.temperature >= 0, f"objective.temperature={self.temperature} must be >= 0")
        _require(0 < self.top_p <= 1, f"objective.top_p={self.top_p} must be in (0, 1]")
        _require(self.top_k >= 0, f"objective.top_k={self.top_k} must be >= 0")
        _require(self.epsilon > 0, f"objective.epsilon={self.epsilon} must be positive")
        _require(
            self.epsilon_high is None or self.epsilon_high > 0,
            f"objective.epsilon_high={self.epsilon_high} must be positive or null",
        )
        _require(self.iterations >= 1, f"objective.iterations must be >= 1, got {self.iterations}")
        _require(
            self.scale_rewards in ("group", "batch", "none"),
            f"objective.scale_rewards={self.scale_rewards!r}: use group, batch or none",
        )
        _require(
            self.name not in ("grpo", "rloo") or bool(self.rewards),
            f"objective={self.name} needs reward functions: objective.rewards=[FILE.py:function, ...] or a built-in "
            "(exact_match:FIELD, format:REGEX, length:N)",
        )
        _require(
            self.reward_weights is None or len(self.reward_weights) == len(self.rewards),
            f"objective.reward_weights has {len(self.reward_weights or [])} weights for {len(self.rewards)} "
            "objective.rewards: give one weight per reward function, or null",
        )


OBJECTIVES = ("sft", "dpo", "grpo", "rloo")
DPO_LOSSES = ("sigmoid", "ipo", "hinge", "robust")
GRPO_LOSSES = ("grpo", "dr_grpo", "dapo")


@dataclass
class LoggerConfig:
    """Where metrics go. metrics.jsonl always; wandb unless disabled (offline without credentials, or
    when an online start fails); TensorBoard when asked."""

    wandb: bool = True  # log to wandb (rank 0) besides metrics.jsonl
    project: str = "trainer"  # the wandb project
    mode: str = "auto"  # auto (WANDB_MODE, else online if wandb finds credentials, else offline) | online | offline
    wandb_name: str | None = None  # the wandb run's name; None: from the Hydra job's overrides (gpt2-fsdp-lr3e-4)
    wandb_group: str | None = None  # the wandb group; None: the sweep dir's name under -m (multirun), else none
    wandb_tags: list[str] | None = None  # the wandb tags; None: the config-group choices (model=gpt2, ...)
    tensorboard: bool = False  # also write the metrics as TensorBoard events in RUN_DIR/tensorboard
    progress_bar: bool = True  # a tqdm bar on rank 0's terminal (off when stdout is not one)

    def __post_init__(self) -> None:
        from importlib.util import find_spec

        _require(self.mode in ("auto", "online", "offline"), f"logger.mode={self.mode!r}: use auto, online or offline")
        _require(
            not self.tensorboard or find_spec("tensorboard") is not None,
            'logger.tensorboard=true needs TensorBoard: pip install -e ".[tensorboard]" (or logger.tensorboard=false)',
        )


@dataclass
class CheckpointConfig:
    """When and where checkpoints are written (a final one is always written)."""

    interval: int = 0  # steps between checkpoints; 0: only the final one
    keep: int = 2  # newest complete checkpoints kept
    async_save: bool = False  # overlap writing with training (torch.distributed.checkpoint.async_save)

    def __post_init__(self) -> None:
        _require(self.interval >= 0, f"checkpoint.interval must be >= 0, got {self.interval}")
        _require(self.keep >= 1, f"checkpoint.keep must be >= 1, got {self.keep}")


@dataclass
class SpikeConfig:
    """Loss / grad-norm spike detection against an EMA baseline."""

    z: float = 6.0  # a value this many standard deviations above the baseline is a spike
    warmup: int = 20  # observations before spikes are flagged (the baseline settles first)
    action: str = "log"  # log (record only) | skip (drop the update) | rollback (last good checkpoint, skip the data)
    max_rollbacks: int = 3  # rollbacks in a row to the same checkpoint (each spiking again) before the run stops

    def __post_init__(self) -> None:
        _require(self.z > 0, f"monitor.spike.z must be positive, got {self.z}")
        _require(self.warmup >= 0, f"monitor.spike.warmup must be >= 0, got {self.warmup}")
        _require(self.max_rollbacks >= 1, f"monitor.spike.max_rollbacks must be >= 1, got {self.max_rollbacks}")
        _require(
            self.action in ("log", "skip", "rollback"),
            f"monitor.spike.action={self.action!r}: use log, skip or rollback",
        )


@dataclass
class MonitorConfig:
    """Per-layer statistics and throughput, logged to metrics.jsonl and wandb."""

    interval: int | None = None  # steps between per-layer statistics; None: every logged step
    spike: SpikeConfig = field(default_factory=SpikeConfig)
    peak_flops: float | None = (
        None  # FLOP/s for MFU; None: datasheet value of a known GPU, or a measured CPU matmul rate
    )
    # A sparse block's router is flagged as collapsed (warning, moe/collapsed) when its busiest expert is
    # among the top-k of at least this share of the step's tokens: 1 is every token, balanced routing k / E
    moe_collapse_share: float = 0.9

    def __post_init__(self) -> None:
        _require(
            self.interval is None or self.interval > 0,
            f"monitor.interval must be positive (or null for every logged step), got {self.interval}",
        )
        _require(
            0 < self.moe_collapse_share <= 1,
            f"monitor.moe_collapse_share must be in (0, 1], got {self.moe_collapse_share}",
        )


@dataclass
class SharpnessConfig:
    """The top Hessian eigenvalue of the loss on a fixed held batch (Lanczos on Hessian-vector
    products), logged as sharpness/lambda_max next to 2 / lr."""

    enabled: bool = False  # measure it (none / ddp / fsdp)
    interval: int = 100  # steps between estimates
    iterations: int = 20  # Lanczos steps at most (one Hessian-vector product each)
    batch_size: int = 4  # sequences in the held batch (the first of the validation split)
    method: str = "auto"  # auto | double_backward | finite_difference (central difference of gradients)

    def __post_init__(self) -> None:
        _require(self.interval > 0, f"diagnostics.sharpness.interval must be positive, got {self.interval}")
        _require(self.iterations > 0, f"diagnostics.sharpness.iterations must be positive, got {self.iterations}")
        _require(self.batch_size > 0, f"diagnostics.sharpness.batch_size must be positive, got {self.batch_size}")
        _require(
            self.method in ("auto", "double_backward", "finite_difference"),
            f"diagnostics.sharpness.method={self.method!r}: use auto, double_backward or finite_difference",
        )


@dataclass
class DiagnosticsConfig:
    """Instruments of the gradient's quality (noise scale) and of the curvature (sharpness); off by default."""

    noise_scale: bool = False  # B_simple = tr(Sigma) / |G|^2 from micro-batch and step gradient norms
    noise_scale_ema: float = 0.95  # smoothing of the two unbiased estimators before their ratio
    sharpness: SharpnessConfig = field(default_factory=SharpnessConfig)

    def __post_init__(self) -> None:
        _require(
            0.0 <= self.noise_scale_ema < 1.0,
            f"diagnostics.noise_scale_ema={self.noise_scale_ema} must be in [0, 1)",
        )


@dataclass
class QuantConfig:
    """Quantisation-aware training: linear weights fake-quantised in forward, straight-through gradient."""

    qat: str | None = None  # null | int8 (per output channel) | int4 (per group of group_size inputs)
    group_size: int = 32  # int4: input columns sharing one scale

    def __post_init__(self) -> None:
        _require(self.qat in (None, "int8", "int4"), f"quant.qat={self.qat!r} is not supported: use null, int8 or int4")
        _require(self.group_size > 0, f"quant.group_size must be positive, got {self.group_size}")


@dataclass
class TrainConfig:
    """The step budget and batch shape. Global batch = micro_batch_size * grad_accum_steps * world size."""

    max_steps: int = 400  # optimizer steps of the run (a resumed run counts from its checkpoint's step)
    micro_batch_size: int = 16  # sequences per forward / backward on each rank
    grad_accum_steps: int = 1  # micro-batches accumulated per optimizer step on each rank
    global_batch_size: int | None = None  # sequences per step; if set, grad_accum_steps is derived from it
    seq_len: int = 128  # tokens per sequence (at most model.block_size)
    seed: int = 1337  # init, data order, dropout and sampling
    log_interval: int = 10  # steps between logged rows (metrics.jsonl, wandb, the console)
    eval_interval: int = 100  # steps between validation losses (and at the last step)
    eval_batches: int = 8  # micro-batches of the validation split per evaluation (the same ones each time)
    device: str = "auto"  # auto | cpu | cuda
    sample_tokens: int = 200  # length of the sample generated at the end (0: none)
    sample_prompt: str = "def "  # the prompt of the sample generated at the end
    num_threads: int = 0  # torch intra-op threads on CPU; 0 leaves torch's default
    tf32: bool = True  # GPU: fp32 matmuls and convolutions on TF32 tensor cores (fp32 runs, fp32 evaluation)
    compile: bool = False  # torch.compile each transformer block and the head + loss (none / ddp / fsdp)
    resume: str = "none"  # none | auto (newest valid checkpoint in the run dir) | a checkpoint directory
    max_consecutive_skips: int = 10  # stop after this many steps in a row with inf / NaN gradients
    # signals on which every rank stops after one agreed step, saves it and exits 75 for a requeue ([]: none)
    preemption_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])

    def __post_init__(self) -> None:
        _require(self.max_steps >= 0, f"train.max_steps must be >= 0, got {self.max_steps}")
        for key in ("micro_batch_size", "grad_accum_steps", "seq_len", "log_interval", "eval_interval"):
            _require(getattr(self, key) > 0, f"train.{key} must be positive, got {getattr(self, key)}")
        _require(self.eval_batches > 0, f"train.eval_batches must be positive, got {self.eval_batches}")
        _require(self.device in ("auto", "cpu", "cuda"), f"train.device={self.device!r}: use auto, cpu or cuda")
        _require(self.sample_tokens >= 0, f"train.sample_tokens must be >= 0, got {self.sample_tokens}")
        _require(
            self.max_consecutive_skips >= 1,
            f"train.max_consecutive_skips must be >= 1, got {self.max_consecutive_skips}",
        )
        _require(
            self.global_batch_size is None or self.global_batch_size > 0,
            f"train.global_batch_size must be positive or null, got {self.global_batch_size}",
        )
        for name in self.preemption_signals:
            _require(
                name in ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT", "SIGHUP", "SIGQUIT"),
                f"train.preemption_signals: {name!r} is not a signal the run stops on; choose from SIGTERM, "
                "SIGUSR1, SIGUSR2, SIGINT, SIGHUP, SIGQUIT",
            )

    def accumulation_steps(self, world_size: int) -> int:
        """Micro-batches per optimizer step on each rank (derived from global_batch_size when set)."""
        if self.global_batch_size is None:
            return self.grad_accum_steps
        per_micro_step = self.micro_batch_size * world_size
        _require(
            self.global_batch_size % per_micro_step == 0,
            f"train.global_batch_size={self.global_batch_size} is not a multiple of train.micro_batch_size x "
            f"world size = {self.micro_batch_size} x {world_size}: use a multiple of {per_micro_step}",
        )
        return self.global_batch_size // per_micro_step


@dataclass
class EvalConfig:
    """Downstream evaluation during training (trainer/evaluation/): lm-evaluation-harness tasks and
    perplexity on held-out text files, every `interval` steps and at the last step. Tasks need the
    optional extra: pip install -e ".[eval]"."""

    # lm_eval task (or group / tag) names: its registry, the shipped tiny tasks (trainer/evaluation/tasks)
    # and the YAMLs under include_path; logged as eval/<task>/<metric> (and <metric>_stderr)
    tasks: list[str] = field(default_factory=list)
    include_path: str | None = None  # a directory of task YAMLs with local data files
    limit: int | None = None  # at most this many documents per task (null: all)
    num_fewshot: int | None = None  # few-shot examples per prompt (null: each task's own)
    apply_chat_template: bool = False  # prompts through the tokenizer's chat template (lm_eval's flag)
    batch_size: int = 8  # requests per forward on each rank
    interval: int | None = None  # steps between evaluations (null: train.eval_interval); also at the last step
    # held-out text files: token perplexity over train.seq_len windows, logged as eval/ppl/<file stem>
    files: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        _require(self.batch_size > 0, f"eval.batch_size must be positive, got {self.batch_size}")
        _require(self.limit is None or self.limit > 0, f"eval.limit must be positive or null, got {self.limit}")
        _require(
            self.num_fewshot is None or self.num_fewshot >= 0,
            f"eval.num_fewshot must be >= 0 or null, got {self.num_fewshot}",
        )
        _require(
            self.interval is None or self.interval > 0,
            f"eval.interval must be positive or null (null: train.eval_interval), got {self.interval}",
        )
        stems = [Path(f).stem for f in self.files]
        _require(
            len(set(stems)) == len(stems),
            f"eval.files={self.files}: two files share a name ({stems}); each is logged as eval/ppl/<file stem>",
        )

    @property
    def enabled(self) -> bool:
        return bool(self.tasks or self.files)


@dataclass
class Config:
    """One run. Each field is a config group (`model=`, `data=`, ...) or a section (`train.*`)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def register_configs() -> None:
    """Put the schema in Hydra's ConfigStore; configs/config.yaml lists it first in its defaults."""
    ConfigStore.instance().store(name="schema", node=Config)
