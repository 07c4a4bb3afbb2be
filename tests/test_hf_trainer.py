"""An HF ``Trainer`` trains a wrapped detector's routes with one added line (``wrap``): its
loop calls ``model(**batch).loss.backward()``, and that loss holds the auxiliary routes'."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import Trainer, TrainingArguments  # noqa: E402

from mrdetr import adapters  # noqa: E402
from mrdetr.testing.hf_families import tiny_batch, tiny_model  # noqa: E402


def _dataset(model, n=4):
    batch = tiny_batch(model, batch=n)
    return [
        {"pixel_values": batch["pixel_values"][i], "labels": batch["labels"][i]} for i in range(n)
    ]


def _collate(items):
    return {
        "pixel_values": torch.stack([x["pixel_values"] for x in items]),
        "labels": [x["labels"] for x in items],
    }


@pytest.mark.parametrize("family", ["deformable_detr", "rt_detr"])
def test_trainer_trains_every_route(family, tmp_path):
    model = tiny_model(family)
    adapters.wrap(model)  # the one added line
    routes = next(m for m in model.modules() if "mrdetr_routes" in m._modules).mrdetr_routes
    before = {k: v.detach().clone() for k, v in routes.named_parameters()}
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2,
        report_to=[], use_cpu=True, remove_unused_columns=False, save_strategy="no",
        logging_steps=1, dataloader_num_workers=0,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=_dataset(model), data_collator=_collate)
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    after = dict(routes.named_parameters())
    # the primary loss never reaches the routes' own parameters: they moved through their losses
    assert all(not torch.equal(before[k], after[k]) for k in before)
