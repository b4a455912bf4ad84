"""optim: parameter groups (decay / no decay, per-block LR), static freezing, the LR schedule,
and the UnfreezeGate that holds gradually unfrozen blocks shut inside a live optimizer.

The gate runs here on a plain torch AdamW over a tiny BERT classifier, stepped the way the
recipe steps it (optimizer step, scheduler step, then `gate.apply(step)`); no DeepSpeed.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: never reach the hub

import math
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

from finetune_trainer.freezing import FreezePlan, plan_freezing
from finetune_trainer.layers import discover
from finetune_trainer.optim import (
    GroupMeta,
    UnfreezeGate,
    apply_plan,
    build_scheduler,
    is_metric_driven,
    param_groups,
)
from finetune_trainer.spec import (
    METRIC_DRIVEN_SCHEDULES,
    FreezingSpec,
    LRScheduleSpec,
    TrainingSpec,
)
from tests.tiny_models import tiny_bert as shared_tiny_bert
from tests.tiny_models import tiny_llama

LR = 1e-2
WEIGHT_DECAY = 0.1
EVERY = 2  # gradual: layer.1 opens at step 2, layer.0 at 4, embeddings at 6
OPENS = {"layer.1": 2, "layer.0": 4, "embeddings": 6}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matrices: one thread is fastest, and it keeps a busy machine's other jobs alone."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_bert(layers: int = 2) -> nn.Module:
    """Without dropout, so two forward passes give the same gradients."""
    return shared_tiny_bert(layers, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def make_plan(model: nn.Module, spec: FreezingSpec) -> FreezePlan:
    names = [n for n, _ in model.named_parameters()]
    return plan_freezing(spec, names, discover(model), steps_per_epoch=10)


def names_of(model: nn.Module) -> dict[int, str]:
    return {id(p): n for n, p in model.named_parameters()}


# --- param_groups and apply_plan ---------------------------------------------------------------


def _no_decay_bert(name: str) -> bool:
    return name.endswith(".bias") or "LayerNorm" in name


def _no_decay_llama(name: str) -> bool:
    return (
        "norm" in name
    )  # input_layernorm, post_attention_layernorm, model.norm; Llama has no biases


@pytest.mark.parametrize(
    ("build", "no_decay"),
    [(tiny_bert, _no_decay_bert), (tiny_llama, _no_decay_llama)],
    ids=["bert", "llama"],
)
@pytest.mark.parametrize(
    "spec",
    [FreezingSpec(), FreezingSpec(strategy="freezeBottom", layers=1, layer_lr_decay=0.5)],
    ids=["none", "freezeBottom+decay"],
)
def test_param_groups_split_decay_from_biases_and_norms(build, no_decay, spec):
    model = build()
    plan = make_plan(model, spec)
    training = TrainingSpec(learning_rate=LR, weight_decay=WEIGHT_DECAY)
    groups, metas = param_groups(model, plan, training)
    assert len(groups) == len(metas)
    by_id = names_of(model)
    factor = {g.block: g.lr_factor for g in plan.groups}
    seen: list[str] = []
    for group, meta in zip(groups, metas, strict=True):
        names = [by_id[id(p)] for p in group["params"]]
        seen += names
        block, kind = meta.name.split("/")
        assert block == meta.block
        assert all(n in next(g.params for g in plan.groups if g.block == block) for n in names)
        if kind == "decay":
            assert not any(no_decay(n) for n in names), names
            assert group["weight_decay"] == WEIGHT_DECAY
        else:
            assert kind == "no_decay"
            assert all(no_decay(n) for n in names), names
            assert group["weight_decay"] == 0.0
        assert group["lr"] == pytest.approx(LR * factor[block])
        assert meta.base_lr == group["lr"]
        assert meta.unfreeze_at is None
    assert sorted(seen) == sorted(plan.trainable), "every trainable tensor in exactly one group"
    assert not set(seen) & set(plan.frozen), "frozen tensors never reach the optimizer"
    # both kinds exist: the split is not vacuous
    assert {m.name.split("/")[1] for m in metas} == {"decay", "no_decay"}


def test_param_groups_carry_each_blocks_unfreeze_step():
    model = tiny_bert()
    plan = make_plan(model, FreezingSpec(strategy="gradual", unfreeze_every=EVERY))
    _, metas = param_groups(model, plan, TrainingSpec(learning_rate=LR))
    assert [m.name for m in metas] == [
        "embeddings/decay",
        "embeddings/no_decay",
        "layer.0/decay",
        "layer.0/no_decay",
        "layer.1/decay",
        "layer.1/no_decay",
        "top/decay",
        "top/no_decay",
    ]
    assert {m.block: m.unfreeze_at for m in metas} == {**OPENS, "top": None}


def test_apply_plan_sets_requires_grad_from_the_plan():
    model = tiny_bert()
    plan = make_plan(model, FreezingSpec(strategy="freezeBottom", layers=1))
    apply_plan(model, plan)
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == set(plan.frozen)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(plan.trainable)
    apply_plan(model, make_plan(model, FreezingSpec()))  # a later plan can thaw them again
    assert all(p.requires_grad for p in model.parameters())


# --- build_scheduler ---------------------------------------------------------------------------


def lr_trajectory(spec: LRScheduleSpec, total: int) -> list[float]:
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = build_scheduler(spec, optimizer, total)
    lrs = [optimizer.param_groups[0]["lr"]]
    for _ in range(total):
        optimizer.step()
        scheduler.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    return lrs


@pytest.mark.parametrize(
    ("spec", "total", "expected"),
    [
        (
            LRScheduleSpec(type="linear", warmup_steps=2),
            10,
            [0, 0.5, 1, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125, 0],
        ),
        (LRScheduleSpec(type="constant"), 4, [1, 1, 1, 1, 1]),
        (LRScheduleSpec(type="constant_with_warmup", warmup_ratio=0.5), 4, [0, 0.5, 1, 1, 1]),
        # default num_decay_steps: 10% of the run (2 of 20), so it is stable until step 18
        (LRScheduleSpec(type="warmup_stable_decay"), 20, [1] * 19 + [0.5, 0]),
    ],
    ids=["linear-warmup", "constant", "constant-with-warmup-ratio", "wsd-default-decay"],
)
def test_build_scheduler_follows_the_schedule(spec, total, expected):
    assert lr_trajectory(spec, total) == pytest.approx(expected)


def test_cosine_with_warmup_ratio_is_half_way_down_in_the_middle_of_the_decay():
    lrs = lr_trajectory(LRScheduleSpec(type="cosine", warmup_ratio=0.1), 20)  # warmup: 2 steps
    assert lrs[:3] == pytest.approx([0, 0.5, 1])
    assert lrs[11] == pytest.approx(0.5)  # (11 - 2) / 18 of the way
    assert lrs[-1] == pytest.approx(0)


def test_user_decay_steps_and_typed_options_reach_the_schedule():
    wsd = lr_trajectory(LRScheduleSpec(type="warmup_stable_decay", num_decay_steps=10), 20)
    assert (
        wsd[10] == pytest.approx(1)
        and wsd[15] == pytest.approx(0.5)
        and wsd[20] == pytest.approx(0)
    )
    poly = lr_trajectory(LRScheduleSpec(type="polynomial", lr_end=0.1, power=2.0), 10)
    assert poly[-1] == pytest.approx(0.1)
    assert poly[5] == pytest.approx(0.9 * 0.5**2 + 0.1)


def test_plateau_schedule_gets_its_options():
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    spec = LRScheduleSpec(type="reduce_lr_on_plateau", options={"factor": 0.25, "patience": 0})
    scheduler = build_scheduler(spec, optimizer, 100)
    assert isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    scheduler.step(1.0)
    scheduler.step(2.0)  # worse, patience 0: reduced at once
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.25)


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant", "reduce_lr_on_plateau", "greedy"])
def test_is_metric_driven(kind):
    assert is_metric_driven(LRScheduleSpec(type=kind)) is (
        kind in {"reduce_lr_on_plateau", "greedy"}
    )
    assert {"reduce_lr_on_plateau", "greedy"} == METRIC_DRIVEN_SCHEDULES


# --- UnfreezeGate ------------------------------------------------------------------------------


@dataclass
class Rig:
    model: nn.Module
    plan: FreezePlan
    groups: list[dict[str, Any]]
    metas: list[GroupMeta]
    optimizer: torch.optim.AdamW
    scheduler: Any
    gate: UnfreezeGate
    batch: dict[str, torch.Tensor]

    def params(self, block: str) -> dict[str, torch.Tensor]:
        wanted = set(next(g.params for g in self.plan.groups if g.block == block))
        return {n: p for n, p in self.model.named_parameters() if n in wanted}

    def backward(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.model(**self.batch).loss.backward()

    def step(self) -> float:
        """One optimizer step as the recipe takes it, less the gate call; returns the clip norm."""
        self.backward()
        norm = float(nn.utils.clip_grad_norm_(self.model.parameters(), max_norm=1e9))
        self.optimizer.step()
        return norm


def make_rig(
    schedule: LRScheduleSpec | None = None,
    *,
    spec: FreezingSpec | None = None,
    weight_decay: float = WEIGHT_DECAY,
    total: int = 20,
) -> Rig:
    """The recipe's order: plan, freeze, groups, optimizer, scheduler, gate."""
    model = tiny_bert()
    plan = make_plan(model, spec or FreezingSpec(strategy="gradual", unfreeze_every=EVERY))
    apply_plan(model, plan)
    training = TrainingSpec(learning_rate=LR, weight_decay=weight_decay)
    groups, metas = param_groups(model, plan, training)
    optimizer = torch.optim.AdamW(groups, lr=LR, weight_decay=weight_decay)
    scheduler = build_scheduler(schedule or LRScheduleSpec(type="constant"), optimizer, total)
    gate = UnfreezeGate(optimizer, metas, groups)
    generator = torch.Generator().manual_seed(1)
    batch = {
        "input_ids": torch.randint(1, 64, (4, 8), generator=generator),
        "labels": torch.tensor([0, 1, 2, 1]),
    }
    return Rig(model, plan, groups, metas, optimizer, scheduler, gate, batch)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_closed_blocks_stay_bit_identical_despite_weight_decay():
    rig = make_rig()
    start = snapshot(rig.model)
    rig.gate.apply(0)
    for step in range(8):  # `step` optimizer steps done
        rig.step()
        done = step + 1
        for block, opens in OPENS.items():
            unchanged = [torch.equal(p, start[n]) for n, p in rig.params(block).items()]
            if done <= opens:  # every update so far ran with the block shut
                assert all(unchanged), f"{block} moved at step {done} while shut (opens at {opens})"
            else:
                assert not all(unchanged), f"{block} should train after step {opens}"
        assert not all(torch.equal(p, start[n]) for n, p in rig.params("top").items())
        rig.scheduler.step()
        rig.gate.apply(done)


def test_without_the_gate_weight_decay_alone_would_move_a_block():
    """The control for the test above: zero gradients are not enough, lr 0 is what holds them."""
    rig = make_rig()
    start = snapshot(rig.model)
    for p in rig.params("embeddings").values():
        p.register_hook(torch.zeros_like)
    rig.step()
    assert not all(torch.equal(p, start[n]) for n, p in rig.params("embeddings").items())


def test_closed_gradients_are_zeroed_so_clipping_ignores_them():
    rig = make_rig()
    rig.backward()  # gate not applied yet: every block has a gradient
    assert any(p.grad.abs().sum() > 0 for p in rig.params("embeddings").values())
    rig.gate.apply(0)
    rig.backward()
    shut = [n for b in OPENS for n in rig.params(b)]
    grads = {n: p.grad for n, p in rig.model.named_parameters()}
    assert all(torch.count_nonzero(grads[n]) == 0 for n in shut)
    open_grads = [g for n, g in grads.items() if n not in shut]
    assert any(torch.count_nonzero(g) > 0 for g in open_grads)
    expected = torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(g) for g in open_grads])
    )
    norm = nn.utils.clip_grad_norm_(rig.model.parameters(), max_norm=1e9)
    assert float(norm) == pytest.approx(float(expected), rel=1e-6)


def test_opening_removes_the_hook():
    rig = make_rig()
    rig.gate.apply(0)
    rig.gate.apply(OPENS["layer.1"])
    rig.backward()
    assert any(torch.count_nonzero(p.grad) > 0 for p in rig.params("layer.1").values())
    assert all(torch.count_nonzero(p.grad) == 0 for p in rig.params("layer.0").values())


def test_closed_groups_sit_at_lr_zero_and_open_at_the_schedules_current_value():
    total, warmup = 20, 4
    rig = make_rig(LRScheduleSpec(type="linear", warmup_steps=warmup), total=total)
    rig.gate.apply(0)
    for done in range(1, 9):
        rig.step()
        rig.scheduler.step()
        rig.gate.apply(done)
        scale = done / warmup if done < warmup else (total - done) / (total - warmup)
        for meta, group in zip(rig.metas, rig.optimizer.param_groups, strict=True):
            shut = meta.unfreeze_at is not None and done < meta.unfreeze_at
            assert group["lr"] == pytest.approx(0.0 if shut else meta.base_lr * scale), (
                meta.name,
                done,
            )


def test_opening_uses_the_scale_a_metric_driven_schedule_has_reached():
    """ReduceLROnPlateau only multiplies lrs; a shut group sits at 0, so the gate must set it."""
    plateau = LRScheduleSpec(type="reduce_lr_on_plateau", options={"factor": 0.5, "patience": 0})
    rig = make_rig(
        plateau, spec=FreezingSpec(strategy="gradual", unfreeze_every=EVERY, layer_lr_decay=0.5)
    )
    rig.gate.apply(0)
    rig.scheduler.step(1.0)
    rig.scheduler.step(2.0)  # worse: every open group halves
    rig.scheduler.step(3.0)  # and again: a quarter of peak
    opened = rig.gate.apply(OPENS["layer.1"])
    assert opened == ["layer.1"]
    for meta, group in zip(rig.metas, rig.optimizer.param_groups, strict=True):
        if meta.block in {"top", "layer.1"}:
            assert group["lr"] == pytest.approx(meta.base_lr * 0.25), meta.name
        else:
            assert group["lr"] == 0.0, meta.name
    layer1 = next(m for m in rig.metas if m.block == "layer.1")
    top = next(m for m in rig.metas if m.block == "top")
    assert layer1.base_lr == pytest.approx(top.base_lr * 0.5), "the layer's own factor is kept"


def test_opening_clears_the_groups_optimizer_state():
    rig = make_rig()
    rig.gate.apply(0)
    for done in (1, 2):
        rig.step()
        rig.gate.apply(done)  # layer.1 opens after the second step
    layer1 = list(rig.params("layer.1").values())
    layer0 = list(rig.params("layer.0").values())
    top = list(rig.params("top").values())
    assert all(p not in rig.optimizer.state for p in layer1), "state of the opened block is dropped"
    assert all(float(rig.optimizer.state[p]["step"]) == 2 for p in layer0 + top), (
        "others keep theirs"
    )
    rig.step()
    beta1 = rig.optimizer.param_groups[0]["betas"][0]
    for p in layer1:
        state = rig.optimizer.state[p]
        assert float(state["step"]) == 1, (
            "Adam restarts: its bias correction treats the block as new"
        )
        assert torch.allclose(state["exp_avg"], (1 - beta1) * p.grad)
    assert all(float(rig.optimizer.state[p]["step"]) == 3 for p in layer0 + top)


def test_apply_reports_each_opened_block_exactly_once():
    rig = make_rig()
    reported: dict[int, list[str]] = {}
    for step in range(10):
        first = rig.gate.apply(step)
        assert rig.gate.apply(step) == [], "a second call at the same step reports nothing"
        if first:
            reported[step] = first
    assert reported == {opens: [block] for block, opens in OPENS.items()}
    assert rig.gate.opened == {"top", *OPENS}


def test_apply_after_a_gap_opens_every_block_that_is_due():
    rig = make_rig()
    rig.gate.apply(0)
    assert rig.gate.apply(5) == ["layer.0", "layer.1"]  # bottom to top, as the groups are
    assert rig.gate.apply(9) == ["embeddings"]


@pytest.mark.parametrize(
    ("step", "frozen"),
    [
        (0, ["embeddings", "layer.0", "layer.1"]),
        (1, ["embeddings", "layer.0", "layer.1"]),
        (2, ["embeddings", "layer.0"]),
        (3, ["embeddings", "layer.0"]),
        (4, ["embeddings"]),
        (5, ["embeddings"]),
        (6, []),
        (100, []),
    ],
)
def test_frozen_blocks(step, frozen):
    gate = make_rig().gate
    assert gate.active
    assert gate.frozen_blocks(step) == frozen


def test_without_gradual_the_gate_leaves_the_optimizer_alone():
    rig = make_rig(spec=FreezingSpec(strategy="freezeBottom", layers=1))
    before = [g["lr"] for g in rig.optimizer.param_groups]
    assert not rig.gate.active
    assert rig.gate.apply(0) == [] and rig.gate.apply(50) == []
    assert [g["lr"] for g in rig.optimizer.param_groups] == before
    assert rig.gate.frozen_blocks(0) == []


def test_gate_refuses_an_optimizer_with_other_groups():
    rig = make_rig()
    merged = torch.optim.AdamW([p for g in rig.groups for p in g["params"]], lr=LR)
    with pytest.raises(RuntimeError, match=f"1 groups, expected {len(rig.metas)}"):
        UnfreezeGate(merged, rig.metas, rig.groups)


def test_scale_reference_is_not_a_shut_group():
    """With every layer gated, the scale is read off the top block, never a group held at 0."""
    rig = make_rig()
    rig.gate.apply(0)
    for meta, group in zip(rig.metas, rig.optimizer.param_groups, strict=True):
        if meta.unfreeze_at is None:
            group["lr"] = meta.base_lr * 0.3
    rig.gate.apply(OPENS["layer.1"])
    opened = [
        g["lr"]
        for m, g in zip(rig.metas, rig.optimizer.param_groups, strict=True)
        if m.block == "layer.1"
    ]
    assert opened == pytest.approx([LR * 0.3] * 2)
    assert not math.isnan(opened[0])
