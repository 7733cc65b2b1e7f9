"""Grad-CAM: heatmaps of the right shape and range, drawn where the deciding evidence is, for the
class asked, on the compact CNN and torchvision architectures."""

import numpy as np
import pytest
import torch
from torch import nn

from emotion.checkpoint import load_checkpoint, new_checkpoint
from emotion.explain import Explainer, grad_cam, overlay, target_layer
from emotion.labels import LABELS
from emotion.models import build_model
from emotion.preprocess import normalize
from tests.conftest import splitting_margin, tiny_checkpoint


class BrightAndDark(nn.Module):
    """Class 0 is the amount of bright pixels, class 1 of dark ones (against grey 0): a 1x1
    convolution with one channel for each, then global pooling, so each class's evidence lies
    exactly where its pixels are."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1)
        with torch.no_grad():
            self.conv.weight[:] = torch.tensor([1.0, -1.0]).view(2, 1, 1, 1)
            self.conv.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x)).mean(dim=(2, 3))


def two_blobs() -> torch.Tensor:
    """A bright square in the top-left quadrant and a dark one in the bottom-right, on grey."""
    image = torch.zeros(1, 1, 48, 48)
    image[:, :, 6:18, 6:18] = 1.0
    image[:, :, 30:42, 30:42] = -1.0
    return image


@pytest.mark.parametrize(("target", "quadrant"), [(0, (slice(0, 24), slice(0, 24))),
                                                  (1, (slice(24, 48), slice(24, 48)))])
def test_the_heatmap_lies_where_the_asked_class_has_its_evidence(target, quadrant):
    model = BrightAndDark().eval()
    heat = grad_cam(model, model.conv, two_blobs().requires_grad_(), [target])[0]
    assert heat.shape == (48, 48) and heat.min() >= 0 and heat.max() == pytest.approx(1.0)
    assert heat[quadrant].sum() / heat.sum() > 0.95


def test_a_model_that_ignores_three_quadrants_is_explained_by_the_fourth():
    """The compact CNN's real target layer, on a network whose input is masked to the top-left."""
    checkpoint = tiny_checkpoint()
    explainer = Explainer(checkpoint)
    inner = explainer.model
    mask = torch.zeros(1, 1, 48, 48)
    mask[:, :, :24, :24] = 1

    class Masked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x * mask)

    masked = Masked().eval()
    layer, layer_input = target_layer(inner)
    torch.manual_seed(0)
    faces = torch.randn(4, 1, 48, 48)
    classes = masked(faces).argmax(1).tolist()
    heat = grad_cam(masked, layer, faces.requires_grad_(), classes, layer_input)
    # Convolutions' padding and batch-norm shifts, and the bilinear upsampling, leak a little past
    # the quadrant's edge; the other quadrants, which the network never sees, get a trickle.
    total = heat.sum(axis=(1, 2))
    assert (heat[:, :24, :24].sum(axis=(1, 2)) / total > 0.75).all()
    for rows, cols in [(slice(0, 24), slice(24, 48)), (slice(24, 48), slice(0, 24)), (slice(24, 48), slice(24, 48))]:
        assert (heat[:, rows, cols].sum(axis=(1, 2)) / total < 0.12).all()


def test_default_model_explains_its_own_top_class_by_default():
    explainer = Explainer(load_checkpoint())
    faces = np.random.default_rng(0).integers(0, 256, (3, 48, 48, 1), dtype=np.uint8)
    explained = explainer.explain(faces)
    assert [e.target for e in explained] == explainer.model(
        torch.from_numpy(((faces / 255.0 - explainer.checkpoint.mean[0]) / explainer.checkpoint.std[0])
                         .transpose(0, 3, 1, 2).astype(np.float32))).argmax(1).tolist()
    assert all(e.heatmap.shape == (48, 48) and 0 <= e.heatmap.min() <= e.heatmap.max() <= 1 for e in explained)
    asked = explainer.explain(faces, classes=[0, 1, 2])
    assert [e.target for e in asked] == [0, 1, 2]


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2", "vgg11_bn"])
def test_torchvision_architectures_get_a_spatial_target_layer(arch):
    torch.manual_seed(0)
    checkpoint = new_checkpoint(build_model(arch, len(LABELS), 1).eval(), arch=arch, arch_kwargs={}, labels=LABELS,
                                input_size=48, channels=1, mean=(0.5,), std=(0.25,))
    explainer = Explainer(checkpoint)
    ((layer, layer_input),) = explainer.layers
    assert isinstance(layer, nn.Conv2d) and not layer_input
    faces = np.random.default_rng(1).integers(0, 256, (2, 48, 48, 1), dtype=np.uint8)
    assert [e.heatmap.shape for e in explainer.explain(faces)] == [(48, 48)] * 2


def test_overlay_is_an_rgb_picture_coloured_by_the_heatmap():
    face = np.full((48, 48, 1), 128, dtype=np.uint8)
    heat = np.zeros((48, 48), dtype=np.float32)
    heat[:24] = 1.0
    picture = np.asarray(overlay(face, heat, side=96))
    assert picture.shape == (96, 96, 3)
    # 'jet' is red at 1 and blue at 0: the hot half is redder than the cold half.
    assert picture[:40, :, 0].mean() > picture[56:, :, 0].mean() + 50


def test_an_ensemble_is_explained_by_each_member_at_its_own_layer():
    from jobs.ensemble import join

    explainer = Explainer(join([tiny_checkpoint(seed=0), tiny_checkpoint(seed=1)]))
    assert len(explainer.layers) == 2 and all(layer_input for _, layer_input in explainer.layers)
    faces = np.random.default_rng(2).integers(0, 256, (2, 48, 48, 1), dtype=np.uint8)
    explained = explainer.explain(faces, classes=[3, 3])
    assert all(e.heatmap.shape == (48, 48) and e.heatmap.max() == pytest.approx(1.0) for e in explained)


def test_a_cascade_explains_each_face_by_the_members_that_weighed_it():
    from jobs.ensemble import join

    members = [tiny_checkpoint(seed=0), tiny_checkpoint(seed=1)]
    faces = np.random.default_rng(3).integers(0, 256, (8, 48, 48, 1), dtype=np.uint8)
    batch = torch.from_numpy(normalize(faces, members[0].mean, members[0].std))
    margin = splitting_margin(members[0], batch)
    with torch.inference_mode():
        top2 = torch.softmax(members[0].build()(batch), dim=1).topk(2, dim=1).values
    unsure = (top2[:, 0] - top2[:, 1] < margin).numpy()
    classes = [5] * len(faces)
    got = Explainer(join(members, cascade_margin=margin)).explain(faces, classes)
    alone = Explainer(members[0]).explain(faces, classes)
    together = Explainer(join(members)).explain(faces, classes)
    assert 0 < unsure.sum() < len(faces)
    for face, explained in enumerate(got):
        expected = (together if unsure[face] else alone)[face]
        assert np.allclose(explained.heatmap, expected.heatmap, atol=1e-5)
    sure = [face for face in range(len(faces)) if not unsure[face]]
    assert not all(np.allclose(alone[face].heatmap, together[face].heatmap, atol=1e-3) for face in sure)
