"""DeepSpeed's checkpoint loading, restricted to tensors and four DeepSpeed classes: a file that
would run code when unpickled is refused instead.

What DeepSpeed 0.19.8 does (read in site-packages/deepspeed): `engine.load_checkpoint` reads every
file of our checkpoints through one method, `engine.checkpoint_engine.load(path, map_location)`:
  - the model states: runtime/engine.py:4568 `_load_checkpoint` -> runtime/state_dict_factory.py:97
    and :123 (`SDLoader.load`) -> `checkpoint_engine.load`;
  - the ZeRO optimizer partitions: runtime/engine.py:4817 (`_get_all_zero_checkpoint_state_dicts`);
  - a stage-0 optimizer with MoE: runtime/engine.py:4683; MoE experts: :4166, :4202, :4239.
The default engine unpickles without restriction: runtime/checkpoint_engine/
torch_checkpoint_engine.py:37, `torch.load(path, map_location=map_location, weights_only=False)`
(the Fast and Decoupled engines call `torch.load(path, map_location=...)`, torch's default).
Paths that bypass the engine, none of which our configuration takes: universal checkpoints
(runtime/zero/stage3.py:3660, :3770; checkpoint/universal_checkpoint.py:251; refused below) and
ZeRO-3 loading without optimizer states (engine.py:4614; we always load them).

So replacing the engine's `load` with `torch.load(weights_only=True)` covers every file a resume
reads. The files hold plain tensors and containers plus these classes (found with
`torch.serialization.get_unsafe_globals_in_checkpoint` on checkpoints of ZeRO 0-3, fp32 and bf16;
the fp16 loss scaler from the source): `fragment_address` (a dataclass of two ints),
`ZeroStageEnum` (an int enum), `LossScaler` and `DynamicLossScaler` (numbers and a dtype). Under
weights_only torch builds them from their fields and calls no other code; anything else (an
`os.system` or `Path.touch` hidden in `__reduce__`) raises UnpicklingError before it runs.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)


def safe_globals() -> list[Any]:
    """The DeepSpeed classes its checkpoints pickle, which torch's weights_only unpickler may build."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [fragment_address, ZeroStageEnum, LossScaler, DynamicLossScaler]


def weights_only_load(path: str, map_location: Any = None) -> Any:
    """`torch.load` that unpickles only tensors, containers, numbers and `safe_globals()`."""
    with torch.serialization.safe_globals(safe_globals()):
        return torch.load(path, map_location=map_location, weights_only=True)


def restrict(engine: Any) -> None:
    """Make `engine.load_checkpoint` read through `weights_only_load`. The engine instance's
    `load` is replaced (not its class): whichever checkpoint engine the DeepSpeed config chose
    (Torch, Fast, Decoupled) reads our files with a plain `torch.load`."""
    if engine.load_universal_checkpoint():
        raise ValueError("spec.deepspeed.config: checkpoint.load_universal reads files with torch.load(weights_only=False) "
                         "outside the checkpoint engine; it is not supported (remove it)")
    engine.checkpoint_engine.load = weights_only_load


def load(engine: Any, folder: str | Path, tag: str, *, frozen: frozenset[str] = frozenset()) -> None:
    """`engine.load_checkpoint(folder, tag)` with every file read by `weights_only_load`. LR
    scheduler states are not DeepSpeed's to restore (the recipe keeps its own schedule).

    `frozen`: parameters the checkpoint was saved without (`save_checkpoint(exclude_frozen_parameters=
    True)`, adapters over a frozen base). DeepSpeed's strict module load would refuse their absence
    and its non-strict one would accept anything missing; `_load_without` accepts exactly them.

    Only this rank's part: the one collective of DeepSpeed's load (ZeRO-3's gather of its persistent
    parameters, the optimizer's `checkpoint_event_epilogue`, engine.py after the files are read; ZeRO
    0-2 load without any) is held back for `finish`. Why: a checkpoint that does not load on one
    rank (a file that is garbled but matches its marker) must let that rank report it to the others
    (`resume`), not leave them waiting in a gather it never joins. Call `finish` on every rank once
    every rank loaded the same checkpoint."""
    restrict(engine)
    optimizer = engine.optimizer
    held = optimizer is not None and hasattr(optimizer, "checkpoint_event_epilogue")
    if held:
        optimizer.checkpoint_event_epilogue = lambda: None  # this instance only; `finish` runs the real one
    try:
        custom = (lambda src, dst: _load_without(src, dst, frozen)) if frozen else None
        path, _ = engine.load_checkpoint(str(folder), tag=tag, load_lr_scheduler_states=False, custom_load_fn=custom)
    finally:
        if held:
            del optimizer.checkpoint_event_epilogue  # the class's method again
    if path is None:
        raise RuntimeError(f"DeepSpeed found no checkpoint under {folder} (tag {tag})")


def _load_without(src: dict[str, Any], dst: torch.nn.Module, frozen: frozenset[str]) -> None:
    """The module state of a checkpoint saved without `frozen`: every other key must be there."""
    saved_frozen = sorted(frozen & set(src))
    result = dst.load_state_dict(src, strict=False)
    missing = sorted(set(result.missing_keys) - frozen)
    if missing or result.unexpected_keys or saved_frozen:
        raise RuntimeError(f"the checkpoint's module state does not match the adapters being trained: missing {missing[:3]}, "
                           f"unexpected {sorted(result.unexpected_keys)[:3]}, frozen but saved {saved_frozen[:3]}")


def finish(engine: Any) -> None:
    """The collective end of `load` (ZeRO-3: gather the persistent parameters); every rank calls it."""
    if engine.optimizer is not None and hasattr(engine.optimizer, "checkpoint_event_epilogue"):
        engine.optimizer.checkpoint_event_epilogue()
