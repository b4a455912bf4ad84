"""Padding-free packing (packing.py, data.py's packed splits): whole examples side by side in
maxSeqLength blocks with position ids restarting per example, so that each example's loss is its
loss alone, token by token, for training and evaluation alike; boundaries carry no loss;
completion-only labels survive; model families whose attention would mix packed examples are
refused at validation. Real tokenizer (SmolLM2's, with its chat template) and tiny models built from
configs, in-process. The splits are the preflight's sample (data_sample.check: the file's rows
tokenized by data.tokenize_causal, as the ingest's tasks tokenize each batch); that a run's ingest
packs the same examples is tests/integration/test_chat_ingest.py's.

Tolerance: per-token losses agree to atol 1e-5 (float32; measured differences are ~1e-7, the
summation order of a longer row). Cross-talk shifts them by ~1e-2, far outside it.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: never reach the hub

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers as tf
import yaml
from torch import nn

from finetune_trainer import packing
from finetune_trainer.data import IGNORE_INDEX, TokenizedSplit, tokenize_causal
from finetune_trainer.data_sample import check
from finetune_trainer.evaluation import evaluate
from finetune_trainer.packing import PACKABLE_MODEL_TYPES, forward_kwargs, pack
from finetune_trainer.preflight import prepare_job
from finetune_trainer.preview import describe
from finetune_trainer.preview import lines as preview_lines
from finetune_trainer.preview import load as preview_load
from finetune_trainer.spec import DataSpec, SpecError, parse_job
from tests.tiny_models import tiny_llama
from tests.unit.test_chat import CONVERSATION, smollm, write_jsonl  # noqa: F401  (smollm: a fixture)

ATOL = 1e-5
LIMIT = 40  # maxSeqLength of the text rows
CHAT_LIMIT = 128  # a SmolLM2 chat has ~30 tokens of default system prompt; rotary positions have no limit
TEXTS = ["Paris is the capital of France.", "Two plus two is four, said the teacher to the class.", "Hi.",
         "A long one: " + "the quick brown fox jumps over the lazy dog " * 6, "Rome.", "Water boils at 100 degrees."]  # fmt: skip
CHATS = [CONVERSATION, [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4"}],
         [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}]]  # fmt: skip


# -- the packer itself


def test_first_fit_fills_blocks_restarts_positions_and_masks_each_first_token():
    lengths = [5, 7, 4, 3, 9, 12]
    ids = [list(range(10 * i + 1, 10 * i + 1 + n)) for i, n in enumerate(lengths)]
    out = pack(ids, ids, 12)
    # 5+7 fill block 0; 4+3 open block 1; 9 does not fit its 5 left: block 2; 12 fills block 3
    assert [len(b) for b in out.input_ids] == [12, 7, 9, 12] and out.examples == 6
    assert out.position_ids[0].tolist() == [*range(5), *range(7)]
    assert out.input_ids[1].tolist() == ids[2] + ids[3]
    for block_ids, labels, positions in zip(out.input_ids, out.labels, out.position_ids, strict=True):
        starts = positions == 0
        assert (labels[starts] == IGNORE_INDEX).all()  # no loss predicting an example from the one before
        assert (labels[~starts] == block_ids[~starts]).all()
    with pytest.raises(ValueError, match="more than a block"):
        pack([list(range(13))], [list(range(13))], 12)


def test_a_batch_of_blocks_has_position_ids_and_no_attention_mask_padding_is_its_own_segment():
    out = pack([[1, 2, 3], [4, 5]], [[1, 2, 3], [4, 5]], 4)  # 3 then 2: two blocks, one padded
    split = TokenizedSplit(out.input_ids, out.labels, position_ids=out.position_ids, examples=out.examples)
    batch = split.batch([0, 1], pad_token_id=0)
    assert "attention_mask" not in batch  # with one, transformers would not look for packed sequences
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 1, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 2, 3], [IGNORE_INDEX, 5, IGNORE_INDEX]]
    assert split.tokens_in([0, 1]) == 5 and forward_kwargs(batch) == {"use_cache": False}


# -- a packed example trains and scores as it does alone


def _per_token_losses(model: nn.Module, split: TokenizedSplit) -> list[torch.Tensor]:
    """Each example's per-token losses (trained tokens only), one tensor per example, in block order
    for a packed split (examples cut out of the blocks where the position ids restart)."""
    batch = split.batch(list(range(len(split))), pad_token_id=0)
    with torch.no_grad():
        logits = model(**batch, **forward_kwargs(batch)).logits
    losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:], reduction="none")
    trained = batch["labels"][:, 1:] != IGNORE_INDEX
    out = []
    for row in range(len(split)):
        n = len(split.input_ids[row])
        starts = (split.position_ids[row] == 0).nonzero()[0].tolist() if split.position_ids is not None else [0]
        for start, end in zip(starts, [*starts[1:], n], strict=True):
            span = slice(max(start - 1, 0), end - 1)  # logits at t predict the token at t + 1
            out.append(losses[row, span][trained[row, span]])
    return out


def _prepared(tmp_path: Path, tok: Any, *, packed: bool, **fields: Any) -> tuple[TokenizedSplit, TokenizedSplit]:
    rows = [{"text": t} for t in TEXTS] if "format" not in fields else [{"messages": c} for c in CHATS]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    data = DataSpec.model_validate({"train": path, "validation": path, "maxSeqLength": LIMIT, "packing": packed, **fields})
    out = check(data, "causal-lm", tok)
    # the validation split as the ingest's tasks tokenize it (the sample keeps only train's tokens)
    validation = tokenize_causal(out.frames["validation"], data, tok, "validation", whole_split=False)
    return out.train, validation


def _by_ids(split: TokenizedSplit) -> dict[tuple[int, ...], np.ndarray]:
    """Each example's labels keyed by its ids (packed: cut out of the blocks)."""
    found: dict[tuple[int, ...], np.ndarray] = {}
    for row in range(len(split)):
        ids, labels = np.asarray(split.input_ids[row]), np.asarray(split.labels[row])
        starts = (split.position_ids[row] == 0).nonzero()[0].tolist() if split.position_ids is not None else [0]
        for start, end in zip(starts, [*starts[1:], len(ids)], strict=True):
            found[tuple(ids[start:end].tolist())] = labels[start:end]
    return found


@pytest.mark.parametrize("fields", [{}, {"format": "messages", "maxSeqLength": CHAT_LIMIT}], ids=["text", "messages"])
def test_each_packed_example_has_its_unpacked_loss_token_by_token(tmp_path, smollm, fields):  # noqa: F811
    alone, alone_val = _prepared(tmp_path, smollm, packed=False, **fields)
    packed, packed_val = _prepared(tmp_path, smollm, packed=True, **fields)
    assert len(packed) < len(alone) and packed.examples == len(alone)  # fewer rows, every example inside
    assert packed.num_tokens() == alone.num_tokens()
    # completion-only labels survive: each example's labels inside its block are its labels alone,
    # but for its first token (never trained alone either: nothing predicts it)
    mine, theirs = _by_ids(packed), _by_ids(alone)
    assert mine.keys() == theirs.keys()
    for key, labels in theirs.items():
        assert mine[key][0] == IGNORE_INDEX and mine[key][1:].tolist() == labels[1:].tolist()
    if fields:
        assert any((labels == IGNORE_INDEX).sum() > 1 for labels in mine.values())  # prompts stay untrained
    model = tiny_llama(vocab_size=len(smollm)).eval()
    by_ids = {tuple(np.asarray(ids).tolist()): loss for ids, loss in
              zip(_examples(alone), _per_token_losses(model, alone), strict=True)}  # fmt: skip
    packed_losses = _per_token_losses(model, packed)
    assert len(packed_losses) == len(by_ids)
    for ids, loss in zip(_examples(packed), packed_losses, strict=True):
        torch.testing.assert_close(loss, by_ids[ids], rtol=0, atol=ATOL)
    # evaluation's per-token loss and perplexity: the same numbers over the same tokens
    kw = {"task": "causal-lm", "batch_size": 2, "pad_token_id": 0, "device": torch.device("cpu")}
    got, want = evaluate(model, packed_val, **kw), evaluate(model, alone_val, **kw)
    assert got["tokens"] == want["tokens"]
    assert got["loss"] == pytest.approx(want["loss"], abs=ATOL) and got["perplexity"] == pytest.approx(want["perplexity"], rel=ATOL)
    # training's loss (the model's own, in train mode, as the recipe calls it): the same mean
    model.train()
    whole = packed.batch(list(range(len(packed))), pad_token_id=0)
    one_by_one = alone.batch(list(range(len(alone))), pad_token_id=0)
    torch.testing.assert_close(model(**whole, **forward_kwargs(whole)).loss, model(**one_by_one).loss, rtol=0, atol=ATOL)


def _examples(split: TokenizedSplit) -> list[tuple[int, ...]]:
    return list(_by_ids(split).keys()) if split.position_ids is not None else [tuple(np.asarray(i).tolist()) for i in split.input_ids]


# -- which model families keep packed examples apart


def _tiny(model_type: str) -> nn.Module:
    torch.manual_seed(0)
    common = {"vocab_size": 64, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    builders: dict[str, Callable[[], nn.Module]] = {
        "llama": lambda: tiny_llama(),
        "mistral": lambda: tf.MistralForCausalLM(tf.MistralConfig(**common, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                                                  num_key_value_heads=1, head_dim=8, intermediate_size=32)),
        "qwen2": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**common, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                                            num_key_value_heads=1, intermediate_size=32)),
        "phi3": lambda: tf.Phi3ForCausalLM(tf.Phi3Config(**common, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                                         num_key_value_heads=2, intermediate_size=32)),
        "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(**common, n_positions=64, n_embd=16, n_layer=2, n_head=2)),
        "gpt_neox": lambda: tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(**common, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                                                   intermediate_size=32)),
        "bloom": lambda: tf.BloomForCausalLM(tf.BloomConfig(**common, hidden_size=16, n_layer=2, n_head=2)),
        "opt": lambda: tf.OPTForCausalLM(tf.OPTConfig(**common, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, ffn_dim=32,
                                                      word_embed_proj_dim=16)),
    }  # fmt: skip
    return builders[model_type]().eval()


def _packed_logits_match_alone(model: nn.Module) -> bool:
    examples = [np.random.default_rng(i).integers(3, 60, size=n).tolist() for i, n in enumerate((5, 7, 4))]
    blocks = pack(examples, examples, 16)
    split = TokenizedSplit(blocks.input_ids, blocks.labels, position_ids=blocks.position_ids)
    batch = split.batch([0], pad_token_id=0)
    with torch.no_grad():
        together = model(**batch, **forward_kwargs(batch)).logits[0]
        alone = torch.cat([model(input_ids=torch.tensor([e])).logits[0] for e in examples])
    return bool(torch.allclose(together, alone, rtol=0, atol=ATOL))


@pytest.mark.parametrize("model_type", sorted(PACKABLE_MODEL_TYPES | {"bloom", "opt"}))
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packing_is_allowed_exactly_for_the_families_that_keep_examples_apart(model_type, attention):
    model = _tiny(model_type)
    assert model.config.model_type == model_type
    if model.config._attn_implementation != attention:
        model.set_attn_implementation(attention)
    keeps_apart = _packed_logits_match_alone(model)
    assert keeps_apart == (model_type in PACKABLE_MODEL_TYPES)  # bloom: ALiBi; opt: positions from the mask
    assert (packing.family_problem(model_type) is None) == keeps_apart


def _manifest(tmp_path: Path, tok: Any, model: nn.Module, **data: Any) -> Any:
    folder = tmp_path / model.config.model_type
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    train = write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in CHATS])
    doc = yaml.safe_load((Path(__file__).resolve().parents[2] / "examples" / "causal-lm.yaml").read_text())
    doc["spec"]["model"] = {"source": str(folder), "task": "causal-lm"}
    doc["spec"]["data"] = {"train": train, "validation": train, "format": "messages", "maxSeqLength": CHAT_LIMIT, **data}
    doc["spec"].pop("search", None)
    return parse_job(doc)


def test_validation_accepts_packed_chat_data_on_llama_and_refuses_a_family_that_mixes_examples(tmp_path, smollm):  # noqa: F811
    job = _manifest(tmp_path, smollm, tiny_llama(vocab_size=len(smollm)), packing=True)
    ok = prepare_job(job)
    shown = preview_lines(preview_load(job, 3), CHAT_LIMIT, color=False)  # finetune preview: blocks and their examples
    headers = [line for line in shown if line.startswith("---")]
    assert headers and all(line.startswith(f"--- block {i}:") for i, line in enumerate(headers, start=1))
    assert len(headers) < 3 and sum(int(line.split(", ")[1].split()[0]) for line in headers) == 3  # "N example(s)"
    train = ok.sample.train  # the first rows of the file, packed (a run's packed splits: test_chat_ingest)
    assert train.position_ids is not None and train.examples == len(ok.sample.frames["train"]) == 3  # none dropped
    assert describe(ok.job).endswith("packed into maxSeqLength blocks, each attending only to itself (packing.py)")
    bloom = tf.BloomForCausalLM(tf.BloomConfig(vocab_size=len(smollm), hidden_size=16, n_layer=2, n_head=2))
    with pytest.raises(SpecError) as err:
        prepare_job(_manifest(tmp_path, smollm, bloom, packing=True))
    assert [path for path, _ in err.value.problems] == ["spec.data.packing"]
    assert "bloom" in err.value.render() and "packing: false" in err.value.render()
    prepare_job(_manifest(tmp_path, smollm, bloom, packing=False))  # the same model without packing is fine


def test_a_lora_wrapped_model_keeps_packed_examples_apart():
    """freezing.strategy lora: PEFT's PeftModelForCausalLM passes position_ids and use_cache through."""
    from finetune_trainer.adapters import wrap
    from finetune_trainer.spec.adapters import LoraSpec

    model = wrap(tiny_llama(), LoraSpec(r=4), "causal-lm").eval()
    for name, param in model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at 0 (the adapter a no-op): make it count
            nn.init.normal_(param)
    assert _packed_logits_match_alone(model)


def test_a_model_with_its_own_code_is_not_taken_for_the_family_it_names(tmp_path):
    """trustRemoteCode with an auto_map runs the model's own attention, whatever model_type it claims."""
    import json

    from finetune_trainer.modeling import model_type
    from finetune_trainer.spec import ModelSpec

    tiny_llama().config.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModelForCausalLM": "modeling_x.X"}}))
    spec = ModelSpec(source=str(tmp_path), task="causal-lm")
    assert packing.family_problem(model_type(str(tmp_path), spec)) is None  # its own code is never loaded
    problem = packing.family_problem(model_type(str(tmp_path), spec.model_copy(update={"trust_remote_code": True})))
    assert problem is not None and "own code" in problem and "packing: false" in problem
