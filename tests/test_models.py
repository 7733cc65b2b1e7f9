import pytest
import torch

from emotion.models import available_architectures, build_model

# The torchvision families earlier emotion APIs were built on; any other registry name works too.
TORCHVISION_ARCHITECTURES = ("mobilenet_v2", "resnet18", "resnet50", "efficientnet_v2_s", "vgg19_bn", "vit_b_16")

SMALL_INPUT = {"vit_b_16": ({"image_size": 48}, 48)}


@pytest.mark.parametrize("arch", ["emotion_cnn", *TORCHVISION_ARCHITECTURES])
@pytest.mark.parametrize("channels", [1, 3])
def test_architectures_take_faces_and_give_seven_logits(arch, channels):
    kwargs, size = SMALL_INPUT.get(arch, ({}, 48))
    model = build_model(arch, 7, channels, **kwargs).eval()
    with torch.inference_mode():
        out = model(torch.randn(2, channels, size, size))
    assert out.shape == (2, 7)


def test_unknown_architecture_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown architecture 'resnet9000'.*emotion_cnn.*resnet18"):
        build_model("resnet9000", 7, 1)


def test_registry_names_are_accepted():
    names = available_architectures()
    assert names[0] == "emotion_cnn"
    assert set(TORCHVISION_ARCHITECTURES) <= set(names)


def test_grid_head_reads_each_cell_of_the_last_feature_map():
    model = build_model("emotion_cnn", 7, 1, depth=2, grid=3, hidden=32).eval()
    linears = [m for m in model.head if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(256 * 9, 32), (32, 7)]
    with torch.inference_mode():
        assert model(torch.randn(2, 1, 48, 48)).shape == (2, 7)


def test_residual_branches_start_silent_and_still_learn():
    """The branch's last batch norm starts at zero; with a ReLU after it the branch got no gradient
    and stayed exactly zero through training, leaving half the convolutions dead."""
    torch.manual_seed(0)
    model = build_model("emotion_cnn", 7, 1, depth=2)
    branch_norms = [stage.body[-1][1] for stage in model.features]
    assert all(torch.all(norm.weight == 0) for norm in branch_norms)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = torch.nn.functional.cross_entropy(model(torch.randn(8, 1, 48, 48)), torch.arange(8) % 7)
    loss.backward()
    optimizer.step()
    assert all(norm.weight.abs().sum() > 0 for norm in branch_norms)


def test_plain_stages_stack_convolutions_without_shortcut():
    torch.manual_seed(0)
    model = build_model("emotion_cnn", 7, 1, depth=2, residual=False).eval()
    stage = model.features[0]
    x = torch.randn(2, 1, 48, 48)
    with torch.inference_mode():
        assert torch.equal(stage(x), stage.pool(stage.body(stage.entry(x))))
    assert all(stage.body[-1][1].weight.abs().sum() > 0 for stage in model.features)
    assert isinstance(stage.body[-1][-1], torch.nn.ReLU)
