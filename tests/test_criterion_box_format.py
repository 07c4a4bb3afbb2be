"""Target boxes that are not normalised cxcywh (pixel boxes) raise a clear ValueError."""

import pytest
import torch

from mrdetr.criterion import MultiRouteCriterion
from mrdetr.matching import HungarianMatcher, OneToManyMatcher


def outputs(b=2, q=5, k=3):
    gen = torch.Generator().manual_seed(0)
    return {
        "p": {
            "pred_logits": torch.randn(b, q, k, generator=gen),
            "pred_boxes": torch.rand(b, q, 4, generator=gen) * 0.4 + 0.2,
        }
    }


def criterion():
    return MultiRouteCriterion(3, {"p": HungarianMatcher(), "a": OneToManyMatcher()})


GOOD = {"labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3]] * 2)}


def test_pixel_xyxy_boxes_name_image_format_and_values():
    pixel = {"labels": torch.tensor([1]), "boxes": torch.tensor([[48.0, 240.0, 195.0, 371.0]])}
    with pytest.raises(ValueError) as err:
        criterion()(outputs(), [GOOD, pixel])
    msg = str(err.value)
    assert msg.startswith("MultiRouteCriterion: image 1: target 'boxes' must be normalised cxcywh")
    assert "[48.0, 240.0, 195.0, 371.0]" in msg and "pixel coordinates" in msg
    assert "xyxy" in msg and "box_xyxy_to_cxcywh" in msg


def test_pixel_cxcywh_boxes_do_not_get_the_xyxy_hint():
    pixel = {"labels": torch.tensor([1]), "boxes": torch.tensor([[300.0, 200.0, 40.0, 30.0]])}
    with pytest.raises(ValueError, match="image 0: target 'boxes' must be normalised") as err:
        criterion()(outputs(), [pixel, GOOD])
    assert "xyxy" not in str(err.value).split(":", 3)[-1].split("received")[-1]


def test_slightly_outside_is_rounding_and_accepted():
    edge = {"labels": torch.tensor([1]), "boxes": torch.tensor([[1.0005, 0.0, 0.0, 1.0]])}
    losses = criterion()(outputs(), [GOOD, edge])
    assert torch.isfinite(losses["loss"])


def test_label_errors_still_come_first():
    bad = {"labels": torch.tensor([7]), "boxes": torch.tensor([[300.0, 200.0, 40.0, 30.0]])}
    with pytest.raises(ValueError, match=r"image 1: 'labels' must be in \[0, 3\), received 7"):
        criterion()(outputs(), [GOOD, bad])
