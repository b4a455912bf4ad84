"""Padding-free packing for causal-lm: whole examples placed side by side in blocks of at most
`spec.data.maxSeqLength` tokens, attention kept inside each example.

What keeps examples apart is the position ids, as transformers reads them: they restart at 0 at
every example, and when a batch comes with `position_ids` and no `attention_mask`,
`masking_utils.find_packed_sequence_indices` turns each restart into a new segment and
`create_causal_mask` builds a block-diagonal causal mask for sdpa and eager attention, on CPU and
GPU alike (the trainer loads models with transformers' default, sdpa). Flash attention is not used:
the trainer image has no flash-attn kernels, and transformers derives varlen boundaries from position
ids only for a batch flattened into one row (DataCollatorWithFlattening's [1, total] shape), which
the sdpa mask would make quadratic in the whole batch. This is the layout of
transformers' `DataCollatorWithFlattening` (position ids restarting per example, the label of each
example's first token -100 so nothing is trained to predict example B from example A's end),
with examples grouped into fixed-size blocks so a step's shape stays bounded.
Placing examples into blocks is bin packing, which no library we run does for token lists: written
here. Pure numpy (no torch): the driver and a Ray Data `map_batches` step call `pack`.

The fill is greedy first-fit in the examples' (already shuffled) order: each example goes into the
first of the last `WINDOW` open blocks it fits in, else opens a new block. The window bounds the cost
(O(examples x WINDOW)) on millions of rows while filling nearly as well as full first-fit, and the
result depends only on the input order, so it is the same on every worker and on every resume.
An example longer than a block cannot occur: examples are cut to maxSeqLength before packing, as
they are without packing (so a packed run trains on exactly the same tokens). An example is never
split across blocks.

Whether a model family honours the restart is a property of its transformers implementation, not
of the data: `family_problem` refuses packing, at validation, for every model type not verified in
tests/unit/test_packing.py (a packed example's loss equals its loss alone, token by token).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

IGNORE_INDEX = -100  # label value torch's cross-entropy skips (data.IGNORE_INDEX is the same)
WINDOW = 64  # open blocks first-fit looks into (see the module docstring)

# model_type values whose transformers implementation builds the block-diagonal mask from restarting
# position ids with attention_mask None (and, where positions are learned or rotary, reads them from
# the same position ids). Each one is checked token by token in tests/unit/test_packing.py;
# a family is added here only together with its test. Not here, because they mix packed examples
# (measured in that test): bloom (ALiBi biases from the attention mask, no position ids) and opt
# (positions from the attention mask's cumulative sum).
PACKABLE_MODEL_TYPES = frozenset({"llama", "gpt2", "mistral", "qwen2", "gpt_neox", "phi3"})


@dataclass
class Blocks:
    """Packed blocks: token ids, labels (-100 where untrained) and position ids, one array each per
    block (unpadded, at most the block length); `examples` is how many examples they hold."""

    input_ids: list[np.ndarray]
    labels: list[np.ndarray]
    position_ids: list[np.ndarray]
    examples: int


Tokens = Sequence[int] | np.ndarray  # one example's ids or labels


def pack(ids: Sequence[Tokens], labels: Sequence[Tokens], block_len: int) -> Blocks:
    """Examples (token ids and per-token labels, each at most `block_len` long) -> blocks.

    Raises ValueError for an example longer than a block or ids/labels of different lengths:
    callers cut examples first (data.py does, at maxSeqLength)."""
    bins: list[list[int]] = []  # example indices per block
    room: list[int] = []
    open_blocks: list[int] = []  # indices of blocks that may still take an example, oldest first
    for i, (seq, target) in enumerate(zip(ids, labels, strict=True)):
        n = len(seq)
        if n != len(target):
            raise ValueError(f"example {i}: {n} token ids but {len(target)} labels")
        if n > block_len:
            raise ValueError(f"example {i} has {n} tokens, more than a block ({block_len}); cut examples first")
        if n == 0:
            continue
        for b in open_blocks:
            if room[b] >= n:
                break
        else:
            b = len(bins)
            bins.append([])
            room.append(block_len)
            open_blocks.append(b)
            if len(open_blocks) > WINDOW:
                open_blocks.pop(0)
        bins[b].append(i)
        room[b] -= n
        if room[b] == 0:
            open_blocks.remove(b)
    out = Blocks([], [], [], sum(len(members) for members in bins))
    for members in bins:
        out.input_ids.append(np.concatenate([np.asarray(ids[i], dtype=np.int32) for i in members]))
        block_labels: list[np.ndarray[Any, Any]] = []
        for i in members:
            target = np.array(labels[i], dtype=np.int32)  # a copy: the caller's labels stay as they are
            target[0] = IGNORE_INDEX  # no loss for predicting this example's first token from the one before
            block_labels.append(target)
        out.labels.append(np.concatenate(block_labels))
        out.position_ids.append(np.concatenate([np.arange(len(ids[i]), dtype=np.int32) for i in members]))
    return out


def forward_kwargs(batch: dict) -> dict[str, bool]:
    """Extra model arguments for a packed batch (one with position_ids): no KV cache. transformers
    looks for packed sequences only when there is no cache, and a causal-lm forward builds one by
    default (config.use_cache), which would silently drop the block-diagonal mask."""
    return {"use_cache": False} if "position_ids" in batch else {}


def pad_positions(position_ids: np.ndarray, width: int) -> np.ndarray:
    """A block's position ids right-padded to `width`; the padding restarts at 0, so it is a segment
    of its own that no real token attends to (transformers' packed-sequence mask), and its labels
    are -100. No attention_mask is passed with packed batches: one would switch the detection off."""
    out = np.arange(width, dtype=np.int64) - len(position_ids)
    out[: len(position_ids)] = position_ids
    return out


def family_problem(model_type: str | None) -> str | None:
    """Why `spec.data.packing` cannot be used with this model type, or None when it can."""
    if model_type in PACKABLE_MODEL_TYPES:
        return None
    known = ", ".join(sorted(PACKABLE_MODEL_TYPES))
    return (f"packing keeps examples apart through restarting position ids, which this trainer has verified only for "
            f"model types {known}; the model is {model_type or 'of an unknown type'}, whose attention may mix "
            "packed examples; set packing: false")
