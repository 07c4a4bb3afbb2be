"""``match_sets``: the matching of a whole criterion call (every route, layer and encoder set).

Matchers of this package (see :func:`~mrdetr.matching.batch.plannable`) go through
:func:`~mrdetr.matching.batch.match_all` together; any other callable (a user's matcher, a
matcher subclass with its own ``match_packed``) is called as before, and its indices' range
checks ride on the same read as flags. The result per set is the flat ``(image_idx, pred_idx,
gt_idx)`` the losses index with, and the per-image pairs for the mask losses.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from torch import Tensor

from .batch import Problem, match_all, plannable
from .indices import flatten_unchecked, gt_offsets, raise_out_of_range
from .inputs import PackedTargets, check_predictions

__all__ = ["SetMatch", "match_sets", "prediction_sets", "set_jobs"]


@dataclass
class SetMatch:
    """One prediction set's pairs: ``image``, ``pred``, ``gt`` (``Tensor[M]`` int64 each, ``gt``
    into the concatenated targets) and ``pairs``, per image ``(pred_idx, gt_idx)``."""

    image: Tensor
    pred: Tensor
    gt: Tensor
    pairs: Sequence[tuple[Tensor, Tensor]]

    @property
    def flat(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(image, pred, gt)``."""
        return self.image, self.pred, self.gt


def match_sets(
    sets: Sequence[tuple[Mapping[str, Tensor], object]],
    targets: Sequence[Mapping],
    packed: PackedTargets,
    num_classes: int,
    who: str,
    flags: Sequence[Tensor] = (),
    check: Callable[[list[bool]], None] | None = None,
) -> list[SetMatch]:
    """Match every ``(outputs, matcher)`` of ``sets`` (outputs validated: ``pred_logits
    (Tensor[B, Q, K])``, ``pred_boxes (Tensor[B, Q, 4])``) against ``targets`` / ``packed``
    with one device read: ``packed``'s value checks, ``flags`` (passed to ``check`` as host
    bools, see :func:`match_all`) and the user matchers' index checks ride on it."""
    problems, direct = [], {}
    device = packed.labels.device
    for i, (out, matcher) in enumerate(sets):
        if plannable(matcher):
            problems.append(Problem(matcher, out["pred_logits"], out["pred_boxes"]))
        else:
            indices = matcher(out, targets)
            q = out["pred_logits"].shape[1]
            flat = flatten_unchecked(indices, packed.sizes, q, device, who)
            direct[i] = (indices, q, flat)
    own = [d[2][3] for d in direct.values()]
    mine = None if check is None else (lambda got: check(got[: len(flags)]))
    matched, got = match_all(problems, packed, num_classes, who, [*flags, *own], mine)
    for (_, q, (image, pred, gt, bad)), failed in zip(
        direct.values(), got[len(flags) :], strict=True
    ):
        if failed:  # the error path: locate and raise
            raise_out_of_range(image, pred, gt, bad, packed.sizes, q, who)
    results, planned = [], iter(matched)
    for i in range(len(sets)):
        if i in direct:
            indices, _, (image, pred, gt, _) = direct[i]
            gt = gt + gt_offsets(packed.sizes, device)[image] if gt.numel() else gt
            results.append(SetMatch(image, pred, gt, indices))
        else:
            m = next(planned)
            results.append(SetMatch(*m.flat(), m.pairs()))
    return results


def prediction_sets(
    route: str, out: object, num_logits: int, softmax: bool = False
) -> list[tuple[str, Mapping]]:
    """``[(suffix, predictions)]`` of one route's ``out`` (the criterion's layout): ``"layer{l}"``
    for ``aux_outputs`` then the last layer, and ``"enc"`` for ``enc_outputs``; each checked
    (:func:`~mrdetr.matching.inputs.check_predictions`) to have ``num_logits`` class logits
    (``softmax``: the criterion's ``num_classes + 1``, the last no-object)."""
    if not isinstance(out, Mapping):
        raise ValueError(f"outputs[{route!r}] must be a dict, received {type(out).__name__}")
    aux = out.get("aux_outputs", [])
    if not isinstance(aux, Sequence) or isinstance(aux, Mapping):
        raise ValueError(f"outputs[{route!r}]['aux_outputs'] must be a list of dicts")
    sets = [(f"layer{i}", a) for i, a in enumerate(aux)]
    sets.append((f"layer{len(aux)}", out))
    if out.get("enc_outputs") is not None:
        sets.append(("enc", out["enc_outputs"]))
    for name, s in sets:
        logits, _ = check_predictions(s, f"MultiRouteCriterion: route {route!r}, {name}")
        if logits.shape[-1] != num_logits:
            expected = (
                f"num_classes + 1 = {num_logits} (softmax: the last is no-object)"
                if softmax
                else f"num_classes = {num_logits}"
            )
            raise ValueError(
                f"MultiRouteCriterion: route {route!r}, {name}: pred_logits has "
                f"{logits.shape[-1]} classes, expected {expected}"
            )
    return sets


def set_jobs(routes: Mapping[str, list], router, encoder_matcher=None) -> list[tuple]:
    """``[(route, suffix, label, predictions, matcher)]``: every prediction set of ``routes``
    (``{route: prediction_sets(...)}``) with each matcher of its route in ``router`` (a
    :class:`~mrdetr.matching.RouteMatcher`; ``label`` is the matcher group's label, ``None``
    for a single matcher), ``encoder_matcher`` for ``"enc"`` sets when given."""
    jobs = []
    for route, sets in routes.items():
        if route not in router:
            raise ValueError(
                f"MultiRouteCriterion: no matcher for route {route!r}; the matcher has "
                f"{sorted(router)}"
            )
        for suffix, out in sets:
            if suffix == "enc" and encoder_matcher is not None:
                entries = {None: encoder_matcher}
            else:
                entries = router.entries(route)
            jobs += [(route, suffix, label, out, m) for label, m in entries.items()]
    return jobs
