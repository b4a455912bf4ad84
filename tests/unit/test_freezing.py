"""freezing.plan_freezing: every strategy turned into a plan (frozen tensors, optimizer groups
bottom to top, unfreeze steps, LR factors) on a tiny BERT classifier and a tiny Llama, and the
problems only the model reveals reported at the spec field the user must change."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: never reach the hub

from dataclasses import dataclass

import pytest

from finetune_trainer.freezing import FreezePlan, needs_layers, plan_freezing
from finetune_trainer.layers import LayerMap, discover
from finetune_trainer.spec import FreezingSpec, SpecError
from tests.tiny_models import tiny_bert, tiny_llama

N_LAYERS = 4
BLOCKS = ["embeddings", "layer.0", "layer.1", "layer.2", "layer.3", "top"]  # bottom to top


@dataclass(frozen=True)
class Subject:
    kind: str
    names: list[str]
    layer_map: LayerMap

    def block(self, name: str) -> tuple[str, ...]:
        return next(b.params for b in self.layer_map.bottom_up() if b.name == name)

    def plan(
        self, spec: FreezingSpec, *, steps_per_epoch: int = 10, mapped: bool = True
    ) -> FreezePlan:
        layer_map = self.layer_map if mapped else None
        return plan_freezing(
            spec, self.names, layer_map, steps_per_epoch=steps_per_epoch, model_name=self.kind
        )


def _subject(kind: str) -> Subject:
    model = tiny_bert(N_LAYERS) if kind == "bert" else tiny_llama(N_LAYERS, tied=kind == "llama-tied")
    return Subject(kind, [n for n, _ in model.named_parameters()], discover(model))


@pytest.fixture(scope="module")
def subjects() -> dict[str, Subject]:
    return {kind: _subject(kind) for kind in ("bert", "llama", "llama-tied")}


@pytest.fixture(params=["bert", "llama"])
def subject(request, subjects) -> Subject:
    return subjects[request.param]


def assert_consistent(plan: FreezePlan, names: list[str]) -> None:
    """Frozen and trainable split every parameter exactly once; both keep the model's order."""
    assert sorted([*plan.frozen, *plan.trainable]) == sorted(names)
    assert len(set(plan.frozen) | set(plan.trainable)) == len(names)
    assert list(plan.frozen) == [n for n in names if n in set(plan.frozen)]
    assert all(g.params for g in plan.groups), "no empty optimizer group"


def factors(plan: FreezePlan) -> dict[str, float]:
    return {g.block: g.lr_factor for g in plan.groups}


# --- which strategies need the layer map ---------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "needed"),
    [
        (FreezingSpec(), False),
        (FreezingSpec(strategy="freezeBottom", layers=2), True),
        (FreezingSpec(strategy="featureExtraction"), True),
        (FreezingSpec(strategy="gradual", unfreeze_every=5), True),
        (FreezingSpec(strategy="patterns", trainable_patterns=["classifier"]), False),
        (FreezingSpec(layer_lr_decay=0.8), True),
        (FreezingSpec(strategy="patterns", frozen_patterns=["embed"], layer_lr_decay=0.8), True),
    ],
    ids=[
        "none",
        "freezeBottom",
        "featureExtraction",
        "gradual",
        "patterns",
        "none+decay",
        "patterns+decay",
    ],
)
def test_needs_layers(spec, needed):
    assert needs_layers(spec) is needed


@pytest.mark.parametrize(
    "spec",
    [
        FreezingSpec(strategy="freezeBottom", layers=1),
        FreezingSpec(strategy="featureExtraction"),
        FreezingSpec(strategy="gradual", unfreeze_every=5),
        FreezingSpec(layer_lr_decay=0.5),
    ],
    ids=["freezeBottom", "featureExtraction", "gradual", "layerLrDecay"],
)
def test_strategies_that_need_layers_fail_at_the_strategy_without_a_map(subjects, spec):
    with pytest.raises(SpecError) as err:
        subjects["bert"].plan(spec, mapped=False)
    [(path, message)] = err.value.problems
    assert path == "spec.freezing.strategy"
    assert "bert" in message and "layer stack" in message


# --- none ----------------------------------------------------------------------------------


def test_none_without_a_map_trains_everything_in_one_group(subject):
    plan = subject.plan(FreezingSpec(), mapped=False)
    assert_consistent(plan, subject.names)
    assert plan.frozen == ()
    [group] = plan.groups
    assert (group.block, group.params, group.lr_factor, group.unfreeze_at) == (
        "model",
        tuple(subject.names),
        1.0,
        None,
    )


def test_none_with_a_map_trains_every_block_from_the_start(subject):
    plan = subject.plan(FreezingSpec())
    assert_consistent(plan, subject.names)
    assert plan.frozen == ()
    assert [g.block for g in plan.groups] == BLOCKS
    assert all(g.lr_factor == 1.0 and g.unfreeze_at is None for g in plan.groups)
    assert plan.unfreeze_steps() == {}


# --- freezeBottom --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("layers", "count"),
    [(0, 0), (1, 1), (2, 2), (4, 4), (0.25, 1), (0.5, 2), (0.3, 1), (0.99, 3)],
    ids=["0", "1", "2", "all", "quarter", "half", "0.3-rounds-down", "0.99-rounds-down"],
)
def test_freeze_bottom_freezes_embeddings_and_the_bottom_layers(subject, layers, count):
    plan = subject.plan(FreezingSpec(strategy="freezeBottom", layers=layers))
    assert_consistent(plan, subject.names)
    frozen_blocks = ["embeddings", *[f"layer.{i}" for i in range(count)]]
    expected_frozen = {p for b in frozen_blocks for p in subject.block(b)}
    assert set(plan.frozen) == expected_frozen
    assert [g.block for g in plan.groups] == [b for b in BLOCKS if b not in frozen_blocks]
    for group in plan.groups:
        assert group.params == subject.block(group.block)
        assert (group.lr_factor, group.unfreeze_at) == (1.0, None)


@pytest.mark.parametrize("layers", [5, 12])
def test_freeze_bottom_beyond_the_layer_count_names_it(subject, layers):
    with pytest.raises(SpecError) as err:
        subject.plan(FreezingSpec(strategy="freezeBottom", layers=layers))
    [(path, message)] = err.value.problems
    assert path == "spec.freezing.layers"
    assert f"{layers} exceeds the {N_LAYERS} layers of {subject.kind}" in message
    assert f"at most {N_LAYERS}" in message


def test_freeze_bottom_on_tied_llama_keeps_only_the_final_norm_when_all_layers_freeze(subjects):
    tied = subjects["llama-tied"]
    plan = tied.plan(FreezingSpec(strategy="freezeBottom", layers=N_LAYERS))
    assert_consistent(plan, tied.names)
    assert plan.trainable == ("model.norm.weight",)
    assert "model.embed_tokens.weight" in plan.frozen  # which is also the (tied) LM head


# --- featureExtraction ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "head"),
    [("bert", ("classifier.weight", "classifier.bias")), ("llama", ("lm_head.weight",))],
)
def test_feature_extraction_trains_only_the_task_head(subjects, kind, head):
    subject = subjects[kind]
    plan = subject.plan(FreezingSpec(strategy="featureExtraction"))
    assert_consistent(plan, subject.names)
    assert plan.trainable == head
    [group] = plan.groups
    assert (group.block, group.lr_factor, group.unfreeze_at) == ("top", 1.0, None)
    if kind == "bert":
        assert "bert.pooler.dense.weight" in plan.frozen, "the pooler is pre-trained body, not head"


def test_feature_extraction_on_tied_llama_has_no_head_to_train(subjects):
    with pytest.raises(SpecError) as err:
        subjects["llama-tied"].plan(FreezingSpec(strategy="featureExtraction"))
    [(path, message)] = err.value.problems
    assert path == "spec.freezing.strategy"
    assert "llama-tied" in message and "tied" in message
    assert "freezeBottom" in message and "patterns" in message


# --- gradual -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("every", "steps_per_epoch", "k"),
    [(3, 10, 3), (1, 10, 1), ("epoch", 7, 7), ("epoch", 25, 25)],
    ids=["every-3", "every-1", "epoch-of-7", "epoch-of-25"],
)
def test_gradual_unfreezes_top_down_one_block_per_interval(subject, every, steps_per_epoch, k):
    plan = subject.plan(
        FreezingSpec(strategy="gradual", unfreeze_every=every), steps_per_epoch=steps_per_epoch
    )
    assert_consistent(plan, subject.names)
    assert plan.frozen == (), "gradual blocks are in the optimizer from the start, gated"
    assert [g.block for g in plan.groups] == BLOCKS
    at = {g.block: g.unfreeze_at for g in plan.groups}
    assert at == {
        "top": None,
        "layer.3": k,
        "layer.2": 2 * k,
        "layer.1": 3 * k,
        "layer.0": 4 * k,
        "embeddings": 5 * k,
    }
    assert plan.unfreeze_steps() == {b: s for b, s in at.items() if s is not None}


# --- patterns ------------------------------------------------------------------------------

BERT_HEAD = {"classifier.weight", "classifier.bias"}


@pytest.mark.parametrize(
    ("trainable", "frozen", "expected"),
    [
        (["^classifier"], [], lambda names: BERT_HEAD),
        (
            [r"classifier", r"encoder\.layer\.3\."],
            [],
            lambda names: BERT_HEAD | {n for n in names if ".layer.3." in n},
        ),
        (
            [],
            ["embeddings", r"layer\.[01]\."],
            lambda names: {
                n for n in names if not ("embeddings" in n or ".layer.0." in n or ".layer.1." in n)
            },
        ),
        (
            [r"layer\.3\.", "classifier"],
            [r"\.bias$"],
            lambda names: {
                n
                for n in names
                if (".layer.3." in n or "classifier" in n) and not n.endswith(".bias")
            },
        ),
    ],
    ids=["trainable-only", "trainable-search-not-match", "frozen-only", "trainable-minus-frozen"],
)
def test_patterns_select_trainable_parameters(subjects, trainable, frozen, expected):
    bert = subjects["bert"]
    plan = bert.plan(
        FreezingSpec(strategy="patterns", trainable_patterns=trainable, frozen_patterns=frozen),
        mapped=False,
    )
    assert_consistent(plan, bert.names)
    assert set(plan.trainable) == expected(bert.names)
    [group] = plan.groups
    assert (group.block, group.lr_factor, group.unfreeze_at) == ("model", 1.0, None)


def test_patterns_that_match_nothing_are_reported_at_their_index(subjects):
    spec = FreezingSpec(
        strategy="patterns",
        trainable_patterns=["classifier", "^lm_head", "layer"],
        frozen_patterns=["nope"],
    )
    with pytest.raises(SpecError) as err:
        subjects["bert"].plan(spec, mapped=False)
    paths = [p for p, _ in err.value.problems]
    assert paths == ["spec.freezing.trainablePatterns[1]", "spec.freezing.frozenPatterns[0]"]
    message = dict(err.value.problems)["spec.freezing.trainablePatterns[1]"]
    assert "'^lm_head' matches no parameter" in message
    assert subjects["bert"].names[0] in message, "shows what names look like"


def test_patterns_that_freeze_everything_leave_nothing_to_train(subjects):
    with pytest.raises(SpecError) as err:
        subjects["bert"].plan(
            FreezingSpec(strategy="patterns", frozen_patterns=["."]), mapped=False
        )
    [(path, message)] = err.value.problems
    assert path == "spec.freezing.strategy"
    assert "no parameter of bert trainable" in message


# --- layerLrDecay --------------------------------------------------------------------------


def test_layer_lr_decay_multiplies_by_decay_for_each_block_below_the_top(subject):
    plan = subject.plan(FreezingSpec(layer_lr_decay=0.5))
    assert_consistent(plan, subject.names)
    assert factors(plan) == pytest.approx(
        {
            "top": 1.0,
            "layer.3": 0.5,
            "layer.2": 0.25,
            "layer.1": 0.125,
            "layer.0": 0.0625,
            "embeddings": 0.03125,
        }
    )


def test_layer_lr_decay_keeps_each_blocks_depth_when_the_bottom_is_frozen(subject):
    plan = subject.plan(FreezingSpec(strategy="freezeBottom", layers=2, layer_lr_decay=0.8))
    assert factors(plan) == pytest.approx({"top": 1.0, "layer.3": 0.8, "layer.2": 0.64})


def test_layer_lr_decay_combines_with_gradual(subject):
    plan = subject.plan(FreezingSpec(strategy="gradual", unfreeze_every=2, layer_lr_decay=0.9))
    got = {g.block: (g.lr_factor, g.unfreeze_at) for g in plan.groups}
    assert got["top"] == (1.0, None)
    assert got["layer.3"] == (pytest.approx(0.9), 2)
    assert got["embeddings"] == (pytest.approx(0.9**5), 10)


# --- summary -------------------------------------------------------------------------------


def test_summary_of_freeze_bottom(subjects):
    bert = subjects["bert"]
    plan = bert.plan(FreezingSpec(strategy="freezeBottom", layers=2))
    frozen = len(bert.block("embeddings")) + 2 * len(bert.block("layer.0"))
    trainable = len(bert.names) - frozen
    assert plan.summary() == (
        f"{trainable} trainable / {frozen} frozen tensors; "
        "training from step 0: layer.2, layer.3, top"
    )


def test_summary_of_gradual_lists_unfreezes_in_step_order(subjects):
    bert = subjects["bert"]
    plan = bert.plan(FreezingSpec(strategy="gradual", unfreeze_every=5))
    assert plan.summary() == (
        f"{len(bert.names)} trainable / 0 frozen tensors; training from step 0: top; "
        "then layer.3@5, layer.2@10, layer.1@15, layer.0@20, embeddings@25"
    )
