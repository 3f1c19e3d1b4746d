"""Tiny, randomly initialised Hugging Face transformers models for attention-rewrite tests.

Nothing is downloaded: every model is built from a config (``AutoConfig.for_model``) with
random weights drawn under ``torch.manual_seed(seed)`` (global RNG state is restored after).
Sizes are tiny but non-degenerate: hidden width 64, 4 attention heads (head_dim 16 < width),
FFN 128, vocab 128, 2 layers, batch 2; 12 tokens (decoder side of t5/whisper: 6), 17 patch
tokens for vit/clip_vision, 8 encoder frames for whisper.  Every attention head is a genuine
low-rank slice of its input.  No attention_mask is passed (causal/full masks only).

    model, args, kwargs = build("llama")
    out = model(*args, **kwargs)

Integer inputs (``input_ids``/``decoder_input_ids``) are int64; float inputs
(``pixel_values``/``input_features``) are created in ``dtype``.  The model is returned in
``eval()`` mode, in ``dtype``; ``copy.deepcopy(model).double()`` plus ``.double()`` of the float
inputs gives a float64 reference (use attn_implementation="sdpa" for that: the transformers
"eager" attention path upcasts softmax to float32 only, so it is not a true float64
reference).  ``use_cache=False`` is set in every config.
"""
from __future__ import annotations

from typing import Any

import torch
import transformers

__all__ = ["FAMILIES", "build", "config_for"]

FAMILIES: list[str] = [
    "gpt2", "bert", "vit", "clip_text", "clip_vision", "whisper", "t5",
    "llama", "mistral", "qwen2", "qwen3", "phi", "gpt_neox", "deepseek_v2", "deepseek_v3",
]

HIDDEN, HEADS, FFN, VOCAB = 64, 4, 128, 128
BATCH, SEQ = 2, 12
IMAGE, PATCH = 16, 4  # 16 patches (+1 CLS token) for vit / clip_vision
MEL_BINS, SOURCE_POS = 16, 8  # whisper: input_features (B, 16, 16) -> 8 encoder positions

# family -> (model_type for AutoConfig.for_model, model class (built via Auto*), input kind)
_SPECS: dict[str, tuple[str, str, str]] = {
    "gpt2": ("gpt2", "GPT2LMHeadModel", "tokens"),
    "bert": ("bert", "BertModel", "tokens"),
    "vit": ("vit", "ViTModel", "pixels"),
    "clip_text": ("clip_text_model", "CLIPTextModel", "tokens"),
    "clip_vision": ("clip_vision_model", "CLIPVisionModel", "pixels"),
    "whisper": ("whisper", "WhisperModel", "audio"),
    "t5": ("t5", "T5Model", "seq2seq"),
    "llama": ("llama", "LlamaForCausalLM", "tokens"),
    "mistral": ("mistral", "MistralForCausalLM", "tokens"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM", "tokens"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM", "tokens"),
    "phi": ("phi", "PhiForCausalLM", "tokens"),
    "gpt_neox": ("gpt_neox", "GPTNeoXForCausalLM", "tokens"),
    "deepseek_v2": ("deepseek_v2", "DeepseekV2ForCausalLM", "tokens"),
    "deepseek_v3": ("deepseek_v3", "DeepseekV3ForCausalLM", "tokens"),
}

# Families with a mixture-of-experts block: built with experts_implementation="eager"
# (the default "grouped_mm" path has no float64 kernel).
_MOE_FAMILIES = {"deepseek_v2", "deepseek_v3"}

_LLAMA_LIKE = dict(
    # GQA: 2 query heads per kv head
    hidden_size=HIDDEN, num_attention_heads=HEADS, num_key_value_heads=2,
    intermediate_size=FFN, vocab_size=VOCAB, max_position_embeddings=64, head_dim=HIDDEN // HEADS,
)

_MLA = dict(
    hidden_size=HIDDEN, num_attention_heads=HEADS, num_key_value_heads=HEADS,
    intermediate_size=FFN, vocab_size=VOCAB, max_position_embeddings=64,
    kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
    n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
    first_k_dense_replace=1, n_shared_experts=1,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
)


def _spec(family: str) -> tuple[str, str, str]:
    try:
        return _SPECS[family]
    except KeyError:
        raise KeyError(f"unknown family {family!r}; choose from {FAMILIES}") from None


def _family_kwargs(family: str, layers: int) -> dict[str, Any]:
    if family == "gpt2":
        return dict(n_embd=HIDDEN, n_head=HEADS, n_layer=layers, n_inner=FFN, vocab_size=VOCAB,
                    n_positions=64, bos_token_id=1, eos_token_id=2)
    if family == "bert":
        return dict(hidden_size=HIDDEN, num_attention_heads=HEADS, num_hidden_layers=layers,
                    intermediate_size=FFN, vocab_size=VOCAB, max_position_embeddings=64)
    if family == "vit":
        return dict(hidden_size=HIDDEN, num_attention_heads=HEADS, num_hidden_layers=layers,
                    intermediate_size=FFN, image_size=IMAGE, patch_size=PATCH, num_channels=3)
    if family == "clip_text":
        return dict(hidden_size=HIDDEN, num_attention_heads=HEADS, num_hidden_layers=layers,
                    intermediate_size=FFN, vocab_size=VOCAB, max_position_embeddings=64,
                    projection_dim=HIDDEN, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if family == "clip_vision":
        return dict(hidden_size=HIDDEN, num_attention_heads=HEADS, num_hidden_layers=layers,
                    intermediate_size=FFN, image_size=IMAGE, patch_size=PATCH, num_channels=3,
                    projection_dim=HIDDEN)
    if family == "whisper":
        return dict(d_model=HIDDEN, encoder_attention_heads=HEADS, decoder_attention_heads=HEADS,
                    encoder_layers=layers, decoder_layers=layers, encoder_ffn_dim=FFN,
                    decoder_ffn_dim=FFN, vocab_size=VOCAB, num_mel_bins=MEL_BINS,
                    max_source_positions=SOURCE_POS, max_target_positions=64,
                    pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
                    begin_suppress_tokens=None, suppress_tokens=None)
    if family == "t5":
        return dict(d_model=HIDDEN, num_heads=HEADS, d_kv=HIDDEN // HEADS, d_ff=FFN,
                    num_layers=layers, num_decoder_layers=layers, vocab_size=VOCAB,
                    relative_attention_num_buckets=8, relative_attention_max_distance=16,
                    decoder_start_token_id=0)
    if family in ("llama", "mistral", "qwen2", "qwen3"):  # qwen3 always has q_norm / k_norm
        return dict(_LLAMA_LIKE, num_hidden_layers=layers)
    if family == "phi":
        return dict(hidden_size=HIDDEN, num_attention_heads=HEADS, num_hidden_layers=layers,
                    intermediate_size=FFN, vocab_size=VOCAB, max_position_embeddings=64,
                    partial_rotary_factor=0.5)
    if family == "gpt_neox":
        return dict(hidden_size=HIDDEN, num_attention_heads=HEADS, num_hidden_layers=layers,
                    intermediate_size=FFN, vocab_size=VOCAB, max_position_embeddings=64,
                    rotary_pct=0.25)
    if family == "deepseek_v2":  # q projected directly (q_lora_rank=None)
        return dict(_MLA, num_hidden_layers=layers, q_lora_rank=None)
    if family == "deepseek_v3":  # q through a low-rank bottleneck; single expert group
        return dict(_MLA, num_hidden_layers=layers, q_lora_rank=48, n_group=1, topk_group=1)
    raise AssertionError(family)


def config_for(family: str, layers: int = 2, **overrides: Any) -> transformers.PretrainedConfig:
    """Tiny config for ``family``; ``overrides`` are passed to ``AutoConfig.for_model`` verbatim."""
    model_type = _spec(family)[0]
    kw = _family_kwargs(family, layers)
    kw["use_cache"] = False
    kw.update(overrides)
    return transformers.AutoConfig.for_model(model_type, **kw)


def _inputs(family: str, cfg: Any, dtype: torch.dtype, seed: int, batch: int,
            seq: int | None) -> tuple[tuple, dict]:
    kind = _spec(family)[2]
    # float inputs are drawn in float32 and cast, so float64 inputs == float32 inputs .double()
    g = torch.Generator().manual_seed(seed + 12345)
    seq = SEQ if seq is None else seq

    def ids(n: int) -> torch.Tensor:
        return torch.randint(3, cfg.vocab_size, (batch, n), generator=g, dtype=torch.int64)

    if kind == "tokens":
        return (ids(seq),), {}
    if kind == "pixels":
        x = torch.randn(batch, cfg.num_channels, cfg.image_size, cfg.image_size, generator=g,
                        dtype=torch.float32).to(dtype)
        return (), {"pixel_values": x}
    if kind == "audio":
        # the whisper encoder insists on exactly 2 * max_source_positions input frames
        x = torch.randn(batch, cfg.num_mel_bins, 2 * cfg.max_source_positions, generator=g,
                        dtype=torch.float32).to(dtype)
        return (), {"input_features": x, "decoder_input_ids": ids(max(seq // 2, 1))}
    if kind == "seq2seq":
        return (), {"input_ids": ids(seq), "decoder_input_ids": ids(max(seq // 2, 1))}
    raise AssertionError(kind)


@torch.no_grad()
def _rescale_init(model: torch.nn.Module, seed: int) -> None:
    """Make the random model a sharper test of attention.

    Hugging Face inits projections with std 0.02, which at width 64 gives attention scores of
    std ~0.02: softmax is then almost uniform and an error anywhere on the Q.K path barely
    shows in the output.  Here every projection (Linear, GPT-2 Conv1D, conv) is re-drawn as
    N(0, 1/fan_in), so q, k have unit-scale entries and scores std ~1; and every constant
    1-D parameter (zero biases, unit norm weights) gets N(0, 0.1) noise so bias and
    norm-scale paths are exercised.  Embeddings, 3-D expert weights, routers, and other
    parameters keep their Hugging Face init.
    """
    from transformers.pytorch_utils import Conv1D

    g = torch.Generator().manual_seed(seed + 777)
    skip = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding)
            for p in m.parameters(recurse=False)}
    seen: set[int] = set()
    for mod in model.modules():
        for name, p in mod.named_parameters(recurse=False):
            if id(p) in skip or id(p) in seen:
                continue
            seen.add(id(p))
            if p.dim() == 1:
                if p.numel() > 1 and bool((p == p[0]).all()):
                    p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
            elif name == "weight" and isinstance(mod, torch.nn.Linear):
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * p.shape[1] ** -0.5)
            elif name == "weight" and isinstance(mod, Conv1D):  # weight is (in, out)
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * p.shape[0] ** -0.5)
            elif name == "weight" and isinstance(mod, (torch.nn.Conv1d, torch.nn.Conv2d)):
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * fan_in ** -0.5)


def build(family: str, *, dtype: torch.dtype = torch.float32, seed: int = 0, layers: int = 2,
          attn_implementation: str = "sdpa", batch: int = BATCH, seq: int | None = None,
          init: str = "scaled", **overrides: Any) -> tuple[torch.nn.Module, tuple, dict]:
    """Build ``family`` with random weights; returns ``(model.eval(), args, kwargs)``.

    ``overrides`` go into the config; ``batch``/``seq`` size the generated inputs (for the
    token families ``seq`` is the token count; image/audio input sizes come from the config).
    ``init="scaled"`` (default) re-draws projections so attention is far from uniform (see
    ``_rescale_init``); ``init="hf"`` keeps the plain Hugging Face random init.
    ``experts_implementation`` (MoE families only, default ``"eager"``) picks the
    transformers experts kernel.
    """
    if init not in ("scaled", "hf"):
        raise ValueError(f"init must be 'scaled' or 'hf', not {init!r}")
    cls_name = _spec(family)[1]
    auto = transformers.AutoModelForCausalLM if cls_name.endswith(("ForCausalLM", "LMHeadModel")) \
        else transformers.AutoModel
    experts = overrides.pop("experts_implementation", "eager")
    extra: dict[str, Any] = {}
    if family in _MOE_FAMILIES:
        # "grouped_mm" (the transformers default) has no float64 kernel; "eager" loops over
        # experts (data-dependent shapes: ~11 graph breaks under torch.compile); "batched_mm"
        # gathers expert weights densely (float64 ok, one graph).
        extra["experts_implementation"] = experts
    cfg = config_for(family, layers=layers, **overrides)
    # Initialise in float32 whatever ``dtype`` is, so build(f, dtype=torch.float64) has the same
    # weights as build(f).double() (float64 init would draw a different random stream).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = auto.from_config(cfg, attn_implementation=attn_implementation,
                                 dtype=torch.float32, **extra)
    if init == "scaled":
        _rescale_init(model, seed)
    assert type(model).__name__ == cls_name, (type(model).__name__, cls_name)
    model = model.to(dtype).eval()
    model.config.dtype = dtype
    args, kwargs = _inputs(family, model.config, dtype, seed, batch, seq)
    return model, args, kwargs
