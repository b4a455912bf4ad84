"""A bad cell found inside a Ray Data task reaches the user as the DataError naming the spec field,
not as Ray's wrapper with a remote traceback."""

from __future__ import annotations

from finetune_trainer.data import DataError
from finetune_trainer.ingest import _data_error


class _RayLikeWrapper(RuntimeError):
    """What RayTaskError does: the original error kept as `cause`, a traceback in the message."""

    def __init__(self, cause: BaseException):
        super().__init__(f"Traceback (most recent call last): ... {cause}")
        self.cause = cause


def test_the_data_error_inside_ray_s_wrappers_is_what_the_user_gets():
    inner = DataError("spec.data.labels: labels 'maybe' in column 'label' are not among the classes [neg, pos]")
    try:
        try:
            raise _RayLikeWrapper(inner)
        except _RayLikeWrapper as wrapped:
            raise RuntimeError("UserCodeException") from wrapped
    except RuntimeError as outer:
        found = _data_error(outer)
    assert isinstance(found, DataError) and str(found) == str(inner)
    other = ValueError("not a data problem")
    assert _data_error(other) is other
