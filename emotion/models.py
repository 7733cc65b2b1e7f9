"""Architectures by name: torchvision's registry plus one compact CNN for 48x48 grayscale faces.

No weights are ever fetched: every model starts from random initialisation or from one of our
own checkpoints, because the machines this runs on may have no route to a model hub.

torchvision is imported only when a torchvision architecture is asked for: its import adds about
a second to every process that loads the compact default model.
"""

import importlib
from typing import Any

import torch
from torch import nn

COMPACT_ARCHITECTURE = "emotion_cnn"
ENSEMBLE_ARCHITECTURE = "ensemble"


def _conv_bn(in_ch: int, out_ch: int, relu: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False), nn.BatchNorm2d(out_ch)]
    return nn.Sequential(*layers, nn.ReLU(inplace=True)) if relu else nn.Sequential(*layers)


class _Stage(nn.Module):
    """`depth` 3x3 convolutions then 2x2 pooling; with `residual`, all but the first on a shortcut.

    The residual form is a ResNet basic block: the branch ends in batch norm without ReLU and the
    ReLU follows the sum, so a branch whose norm starts at zero still receives gradient. (A ReLU
    at the end of the branch would pass none at exactly zero: the branch would never wake up.)
    `residual=False` is the plain VGG stage.
    """

    def __init__(self, in_ch: int, out_ch: int, depth: int, residual: bool) -> None:
        super().__init__()
        self.residual = residual
        self.entry = _conv_bn(in_ch, out_ch)
        last = depth - 2
        self.body = nn.Sequential(
            *[_conv_bn(out_ch, out_ch, relu=not residual or i < last) for i in range(depth - 1)]
        )
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.entry(x)
        x = torch.relu(x + self.body(x)) if self.residual and len(self.body) else self.body(x)
        return self.pool(x)


class EmotionCNN(nn.Module):
    """A VGG-shaped CNN sized for 48x48 faces: four stages, then a pooled linear head.

    Each stage has `depth` 3x3 convolutions, after the first on a residual branch unless
    `residual` is off (the plain VGG the calibration recipe uses). `grid` pools the last feature
    map to grid x grid cells rather than one: faces arrive roughly aligned, so where a feature
    fires (mouth or brow) carries meaning that global pooling throws away. `hidden` adds a fully
    connected layer over those cells, at almost no cost per image (figures in the model card).
    """

    def __init__(
        self,
        num_classes: int = 7,
        in_channels: int = 1,
        widths: tuple[int, ...] = (32, 64, 128, 256),
        depth: int = 3,
        dropout: float = 0.3,
        grid: int = 1,
        hidden: int = 0,
        residual: bool = True,
    ) -> None:
        super().__init__()
        stages: list[nn.Module] = []
        prev = in_channels
        for width in widths:
            stages.append(_Stage(prev, width, depth, residual))
            prev = width
        self.features = nn.Sequential(*stages)
        features = prev * grid * grid
        layers: list[nn.Module] = [nn.AdaptiveAvgPool2d(grid), nn.Flatten(), nn.Dropout(dropout)]
        if hidden:
            layers += [nn.Linear(features, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout)]
            features = hidden
        self.head = nn.Sequential(*layers, nn.Linear(features, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        # Residual branches start silent, so the untrained network is a plain VGG and early
        # high-learning-rate steps cannot blow up the sum.
        for stage in stages:
            if residual and len(stage.body):
                nn.init.zeros_(stage.body[-1][1].weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class Ensemble(nn.Module):
    """Several networks as one: the mean of their log-probabilities (the log of the geometric mean
    of their probabilities, up to a constant), so members whose logits run on different scales
    weigh alike and the result is still logits for the softmax, mirroring and temperature after
    it. Members are trained apart (`jobs.train`) and joined by `jobs.ensemble`.

    With `cascade_margin`, the first member answers alone for a face whose top two probabilities
    it puts at least that far apart, and only the other faces go through every member: the
    ensemble's gain lies where a single network is unsure, so part of it comes at a fraction of
    the ensemble's cost (figures in docs/model-card.md).
    """

    def __init__(self, members: list[nn.Module], cascade_margin: float | None = None) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        if cascade_margin is not None and not 0 < cascade_margin <= 1:
            raise ValueError(f"cascade_margin must be in (0, 1], not {cascade_margin}")
        if cascade_margin is not None and len(members) < 2:
            raise ValueError("a cascade needs at least two members")
        self.members = nn.ModuleList(members)
        self.cascade_margin = cascade_margin

    def escalated(self, first: torch.Tensor) -> torch.Tensor:
        """Which faces go through every member, from the first member's log-probabilities; in
        float32 whatever the network's precision, so that a face is routed alike in bfloat16,
        float32 and ONNX Runtime."""
        if self.cascade_margin is None:
            return torch.ones_like(first[:, 0], dtype=torch.bool)
        top2 = first.float().exp().topk(2, dim=1).values
        return top2[:, 0] - top2[:, 1] < self.cascade_margin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = torch.log_softmax(self.members[0](x), dim=1)
        if self.cascade_margin is None:
            return self._mean(first, x)
        escalated = self.escalated(first)
        if torch.compiler.is_exporting():
            # An exported graph is one for every input: it runs every member on every face and
            # picks per face, giving the cascade's answers at the whole ensemble's cost.
            return torch.where(escalated[:, None], self._mean(first, x), first)
        rows = torch.nonzero(escalated).squeeze(1)
        out = first.clone()
        if len(rows):
            out[rows] = self._mean(first[rows], x[rows])
        return out

    def _mean(self, first: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        rest = [torch.log_softmax(member(x), dim=1) for member in self.members[1:]]
        return torch.stack([first, *rest]).mean(dim=0)


def _adapt_first_conv(model: nn.Module, in_channels: int) -> None:
    """Swap the first convolution for one taking `in_channels`, keeping every other hyper-parameter."""
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                setattr(
                    parent,
                    name,
                    nn.Conv2d(
                        in_channels,
                        child.out_channels,
                        child.kernel_size,
                        stride=child.stride,
                        padding=child.padding,
                        dilation=child.dilation,
                        groups=1 if child.groups == child.in_channels else child.groups,
                        bias=child.bias is not None,
                    ),
                )
                return
    raise ValueError(f"{type(model).__name__} has no convolution to adapt to {in_channels} channels")


def _torchvision_models() -> Any:
    return importlib.import_module("torchvision.models")


def available_architectures() -> list[str]:
    """Every name build_model accepts."""
    models = _torchvision_models()
    return [COMPACT_ARCHITECTURE, *models.list_models(module=models)]


def build_model(arch: str, num_classes: int, in_channels: int, **kwargs: Any) -> nn.Module:
    """Randomly initialised network `arch` with `num_classes` outputs and `in_channels` inputs.

    `kwargs` go to the architecture's constructor (for example `image_size` for vit_b_16, or
    `widths` for emotion_cnn) and are stored in the checkpoint so loading rebuilds the same graph.
    `ensemble` takes `members`, a list of {"arch", "arch_kwargs"}, and optionally `cascade_margin`
    (see `Ensemble`): it is built here so that an ensemble loads like any checkpoint, but it is
    never trained as one (hence not listed in `available_architectures`).
    """
    if arch == COMPACT_ARCHITECTURE:
        return EmotionCNN(num_classes=num_classes, in_channels=in_channels, **kwargs)
    if arch == ENSEMBLE_ARCHITECTURE:
        return Ensemble([
            build_model(member["arch"], num_classes, in_channels, **member.get("arch_kwargs", {}))
            for member in kwargs["members"]
        ], kwargs.get("cascade_margin"))
    models = _torchvision_models()
    if arch not in models.list_models(module=models):
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(available_architectures())}")
    model = models.get_model(arch, weights=None, num_classes=num_classes, **kwargs)
    if in_channels != 3:
        _adapt_first_conv(model, in_channels)
    return model
