import pytest
import torch

from emotion.models import TORCHVISION_ARCHITECTURES, available_architectures, build_model

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
