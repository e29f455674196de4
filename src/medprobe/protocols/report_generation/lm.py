"""The language model of report generation: checks, loading, identity, and a scratch word-level LM.

Any Hugging Face causal language model (``AutoModelForCausalLM``: GPT-2, Llama/Vicuna,
Mistral...) given as a local folder or a hub name (loaded from the local cache; medprobe
never downloads it silently). :func:`check_causal_lm` reads only the configuration, so a
wrong model fails before any feature is extracted or any step trained.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from medprobe.errors import ConfigError, WeightsError

SPECIAL_TOKENS = {"pad_token": "<pad>", "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}


def _source(lm: str) -> str:
    path = Path(lm).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"lm: {path} is a file; expected a Hugging Face model folder (config.json, weights, "
                              "tokenizer files) or a hub model name")
        return str(path)
    if lm.startswith((".", "/", "~")) or lm.count("/") > 1:
        raise ConfigError(f"lm: folder {path} not found; expected a Hugging Face model folder or a hub model name "
                          "such as lmsys/vicuna-7b-v1.5")
    return lm


def load_config(lm: str) -> Any:
    from transformers import AutoConfig
    src = _source(lm)
    try:
        return AutoConfig.from_pretrained(src)
    except (OSError, ValueError, KeyError) as e:
        raise WeightsError(f"lm: cannot read the configuration of {lm!r} ({str(e).splitlines()[0]}); give a local "
                           "model folder, or download the model into the Hugging Face cache first "
                           "(e.g. `huggingface-cli download lmsys/vicuna-7b-v1.5`)") from None


def check_causal_lm(lm: str) -> Any:
    """The configuration of ``lm``; a ConfigError when it is not a causal language model."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    config = load_config(lm)
    model_type = getattr(config, "model_type", None)
    if getattr(config, "is_encoder_decoder", False) or model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        kind = "an encoder-decoder model" if getattr(config, "is_encoder_decoder", False) else \
            f"model type {model_type!r}"
        raise ConfigError(f"lm: {lm!r} is {kind}, not a causal language model (AutoModelForCausalLM); use a "
                          "decoder-only model such as GPT-2, Llama or Vicuna")
    return config


def lm_identity(lm: str) -> str:
    """What decides the LM's outputs: the bytes of a local folder, else the hub name."""
    from medprobe.backbones.ref import weights_digest
    src = _source(lm)
    return weights_digest(src) if Path(src).is_dir() else f"hub:{src}"


def load_lm(lm: str) -> tuple[Any, Any]:
    """``(model, tokenizer)`` in float32; the tokenizer gets a pad token (its eos) when it has none."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import torch
    check_causal_lm(lm)
    src = _source(lm)
    try:
        tokenizer = AutoTokenizer.from_pretrained(src)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise WeightsError(f"lm: cannot load the tokenizer of {lm!r}: {str(e).splitlines()[0]}") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise WeightsError(f"lm: cannot load the weights of {lm!r}: {str(e).splitlines()[0]}") from None
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"lm: the tokenizer of {lm!r} has no end-of-sequence token; generation could not stop")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def max_positions(config: Any) -> int | None:
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        v = getattr(config, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


# --------------------------------------------------------------------------- scratch LM (tests, benchmark, demo)
def word_level_tokenizer(texts: Iterable[str]) -> Any:
    """A word-level fast tokenizer whose vocabulary is every whitespace-separated word of ``texts``.

    Words keep their punctuation ("zone.", "right-sided"), so decoding (tokens joined by single
    spaces) gives back the text as written, which BLEU's own tokenisation then sees unchanged.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    pre = pre_tokenizers.WhitespaceSplit()
    words = sorted({w for t in texts for w, _ in pre.pre_tokenize_str(t)})
    vocab = {tok: i for i, tok in enumerate(list(SPECIAL_TOKENS.values()) + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.pre_tokenizer = pre
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)


def write_scratch_lm(texts: Iterable[str], folder: str | Path, *, arch: str = "gpt2", layers: int = 2,
                     hidden: int = 64, heads: int = 2, max_positions: int = 256, seed: int = 0) -> Path:
    """Write a randomly initialised causal LM with a word-level vocabulary built from ``texts``.

    ``arch``: ``gpt2`` or ``llama``. The folder is a normal Hugging Face model folder (config,
    safetensors, tokenizer files) that the ``lm`` option of ``report_generation`` accepts.
    """
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig
    tokenizer = word_level_tokenizer(texts)
    ids = {k: tokenizer.convert_tokens_to_ids(v) for k, v in SPECIAL_TOKENS.items()}
    common = dict(vocab_size=len(tokenizer), bos_token_id=ids["bos_token"], eos_token_id=ids["eos_token"],
                  pad_token_id=ids["pad_token"])
    if arch == "gpt2":
        config = GPT2Config(n_positions=max_positions, n_embd=hidden, n_layer=layers, n_head=heads,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common)
    elif arch == "llama":
        config = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                             num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=max_positions,
                             tie_word_embeddings=True, **common)
    else:
        raise ConfigError(f"scratch LM arch must be 'gpt2' or 'llama', got {arch!r}")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    folder = Path(folder)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
