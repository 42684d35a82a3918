"""Seeded random-weight Llama models with a trained BPE tokenizer, made locally (no hub).

Tests, benchmarks and the local fleet need a model that vLLM loads like a real one without any
download. Sizes go from ~1 M parameters (fast tests) to >= 100 M (benchmarks whose compute must be
realistic in relative terms). The same (size, seed) always yields the same files, so a cache folder
keyed by them is safe to reuse.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]


@dataclass(frozen=True, slots=True)
class TinyModelSize:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int


SIZES: dict[str, TinyModelSize] = {
    # ~0.4 M parameters: the fastest engine start and step, for tests.
    "tiny": TinyModelSize(128, 2, 4, 2, 256, 512, 4096),
    # ~10 M: a few layers, still quick; for layer drop/pipeline tests that need > 2 layers.
    "small": TinyModelSize(256, 8, 4, 2, 768, 2048, 8192),
    # ~110 M: benchmarks where compute vs transfer ratios must be meaningful on CPU.
    "base": TinyModelSize(768, 12, 12, 4, 2048, 8192, 16384),
}


def _corpus(seed: int) -> list[str]:
    """A deterministic English-like corpus for training the BPE tokenizer."""
    import random

    rng = random.Random(seed)
    words = (
        "the of and to in is that for it as with was on be by this are at from or an have not which "
        "model token request latency cluster instance gateway operator memory cache layer batch "
        "interactive deadline service scale migrate drop restore queue prompt answer question code "
        "python function return value data time first second user system assistant hello world "
        "kubernetes pod deployment replica metric prometheus stream throughput decode prefill"
    ).split()
    lines = []
    for _ in range(4000):
        n = rng.randint(4, 24)
        lines.append(" ".join(rng.choice(words) for _ in range(n)) + rng.choice([".", "?", "!", ","]))
    lines.extend(f"{i} {i * 7 % 101} {i * 13 % 997}" for i in range(500))
    return lines


def _key(size: str, seed: int) -> str:
    payload = json.dumps({"size": asdict(SIZES[size]), "seed": seed, "v": 1}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def default_cache_dir() -> Path:
    base = os.environ.get("SLOFLEET_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "slofleet"
    )
    return Path(base) / "models"


def write_tiny_model(out_dir: str | Path, size: str = "tiny", seed: int = 0) -> Path:
    """Write a model folder (config, safetensors weights, tokenizer, chat template) to out_dir."""
    if size not in SIZES:
        raise ValueError(f"size: unknown model size {size!r}; choose one of {sorted(SIZES)}")
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    spec = SIZES[size]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)

    config = LlamaConfig(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    # Larger init than default so that greedy decoding has clear (not near-tie) argmaxes in bf16.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.08)
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    return out


def ensure_tiny_model(size: str = "tiny", seed: int = 0, cache_dir: str | Path | None = None) -> Path:
    """Return the cached model folder for (size, seed), making it once (atomically) if missing."""
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    target = root / f"{size}-s{seed}-{_key(size, seed)}"
    if (target / "config.json").exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{size}-", dir=root))
    try:
        write_tiny_model(tmp, size, seed)
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "config.json").exists():  # a concurrent maker won the race otherwise
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
