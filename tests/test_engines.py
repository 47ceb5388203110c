"""MONAI's standard SupervisedTrainer/SupervisedEvaluator with SpineOne's prepare_batch, loss and postprocessing:
the iteration events fire, so standard ignite handlers (NaN stop, gradient clipping) work."""

from __future__ import annotations

import math

import torch
from bundle.codec import OCPCCodec
from bundle.engines import EvaluationBatch, TrainingBatch
from bundle.losses import SpineOneLoss
from bundle.networks import OUTPUT_STRIDE, SpineOne
from bundle.streams import StreamSpec
from bundle.transforms import KeypointsDecoded, OCPCTargetsd
from ignite.engine import Events
from ignite.handlers import TerminateOnNan
from monai.data import DataLoader, Dataset, MetaTensor
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.engines.utils import IterationEvents

SPEC = StreamSpec("disc", ("a", "b"), ("n", "d"))


def _codec() -> OCPCCodec:
    return OCPCCodec([SPEC], radius=2.0, target_stride=1, network_stride=OUTPUT_STRIDE, level_spacing_mm=14.0)


def _items(n: int, nan_at: int | None = None) -> list[dict]:
    items = []
    for i in range(n):
        points = torch.tensor([[8.0, 10.0 + i % 3, 0.0], [22.0, 12.0, 0.0]], dtype=torch.float64)
        image = MetaTensor(torch.rand(1, 32, 32), affine=torch.eye(4, dtype=torch.float64))
        if i == nan_at:
            image[0, 0, 0] = float("nan")
        items.append({"image": image, "disc_points": points, "disc_labels": torch.tensor([0, 1])})
    return items


def _trainer(codec, items, network, loss) -> SupervisedTrainer:
    loader = DataLoader(Dataset(items, transform=OCPCTargetsd(codec)), batch_size=2, shuffle=False, num_workers=0)
    return SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=loader,
        network=network,
        optimizer=torch.optim.SGD(network.parameters(), lr=1e-3),
        loss_function=loss,
        prepare_batch=TrainingBatch(codec),
        decollate=False,
    )


def test_standard_handlers_fire_on_iteration_and_backward_events():
    torch.manual_seed(0)
    codec = _codec()
    network = SpineOne(codec.streams, backbone_depth=18, in_channels=1, attention=None)
    loss = SpineOneLoss(codec.streams)
    trainer = _trainer(codec, _items(6, nan_at=3), network, loss)  # batch 2 (items 2, 3) carries a NaN
    clipped = []

    def clip_gradients(engine) -> None:  # the usual gradient clipping, between backward and the optimiser step
        norm = torch.nn.utils.clip_grad_norm_(engine.network.parameters(), max_norm=0.5)
        after = torch.sqrt(sum((p.grad.detach() ** 2).sum() for p in engine.network.parameters() if p.grad is not None))
        clipped.append((float(norm), float(after)))

    trainer.add_event_handler(IterationEvents.BACKWARD_COMPLETED, clip_gradients)
    trainer.add_event_handler(Events.ITERATION_COMPLETED, TerminateOnNan(output_transform=lambda out: out["loss"]))
    trainer.run()
    assert trainer.state.iteration == 2  # TerminateOnNan (ITERATION_COMPLETED) stopped the run after the NaN batch
    assert len(clipped) == 2 and clipped[0][1] <= 0.5 + 1e-4 and clipped[0][0] > 0.5  # BACKWARD_COMPLETED fired
    assert math.isnan(clipped[1][0])
    parts = loss.logged_parts()
    assert set(parts) == {"disc_heatmap", "disc_offset", "disc_level", "total"}


def test_evaluator_decodes_through_its_postprocessing():
    torch.manual_seed(1)
    codec = _codec()
    network = SpineOne(codec.streams, backbone_depth=18, in_channels=1, attention=None).eval()
    loader = DataLoader(Dataset(_items(3)), batch_size=2, shuffle=False, num_workers=0)
    seen = []
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=loader,
        network=network,
        prepare_batch=EvaluationBatch(codec),
        postprocessing=KeypointsDecoded(codec),
    )
    evaluator.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen.extend(e.state.output))
    evaluator.run()
    assert len(seen) == 3
    for item in seen:  # decollated items: the input, the ground truth as label, the decoded keypoints
        assert set(item["keypoints"]) == {"disc"} and item["pred"].shape == (codec.out_channels, 8, 8)
        assert torch.equal(item["label"]["disc_labels"], torch.tensor([0, 1]))
        expected = codec.decode(item["pred"][None], item["image"].affine)[0]
        assert item["keypoints"] == expected


def test_monai_label_postprocessing_in_the_evaluator_leaves_the_batch_geometry_alone():
    """inference.json's evaluator runs the MONAI Label ``postprocessing`` (decode, then the label map): the label map
    rewrites the *output* image's meta for MONAI Label's writer, while the writers read the batch's own meta."""
    from bundle.monailabel import KeypointsToLabeld
    from monai.transforms import Compose

    torch.manual_seed(2)
    codec = _codec()
    network = SpineOne(codec.streams, backbone_depth=18, in_channels=1, attention=None).eval()
    items = _items(2)
    for item in items:
        item["image"].meta.update({"original_affine": torch.eye(4).numpy() * 2.0, "spatial_shape": [32, 32]})
        item["image"].meta["original_affine"][3, 3] = 1.0
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=DataLoader(Dataset(items), batch_size=2, num_workers=0),
        network=network,
        prepare_batch=EvaluationBatch(codec),
        postprocessing=Compose([KeypointsDecoded(codec), KeypointsToLabeld("pred", codec)]),
    )
    evaluator.run()
    for batch_item, out in zip(evaluator.state.batch, evaluator.state.output):
        assert torch.equal(
            torch.as_tensor(batch_item["image"].meta["original_affine"]).diag(), torch.tensor([2.0] * 3 + [1])
        )
        assert list(batch_item["image"].meta["spatial_shape"]) == [32, 32]
        assert out["pred"].shape == (1, 32, 32, 1) and "keypoints" in out and "result" in out
