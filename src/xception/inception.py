"""A compact Inception V3 for small images: the paper's baseline at the scale of a CPU experiment.

The paper compares Xception with Inception V3 at a similar parameter count. torchvision's
`inception_v3` needs inputs of at least 75 px and is far too slow on a CPU at Fashion-MNIST scale,
so this is Inception V3's topology (Szegedy et al., "Rethinking the Inception Architecture", 2016)
rebuilt for 28-64 px images:

- stem of plain 3x3 convs (the first one not striding, like the compact Xception's stem) and one
  max pool; every conv is followed by batch norm and ReLU, no conv has a bias;
- `InceptionA` modules: 1x1 / 1x1-3x3 / 1x1-3x3-3x3 (a 5x5 factorised into two 3x3s) / pool-1x1;
- `ReductionA`: 3x3 stride 2 / 1x1-3x3-3x3 stride 2 / max pool, concatenated;
- `InceptionC` modules: the 1xn / nx1 factorised branches (n=7 in the paper at 17x17);
- `ReductionB`: 1x1-3x3 stride 2 / 1x1-1xn-nx1-3x3 stride 2 / max pool;
- `InceptionE` modules: the expanded 1x3 and 3x1 branches of the coarsest grid;
- global average pool, dropout, classifier. No auxiliary head (the paper trains without one).

Widths are torchvision's (the paper's) scaled by `width`, so `width=1.0` is the full model's
channel plan; the `inception-v3-compact` preset picks the width that matches the parameter count of
`xception-compact`. The model exposes the same API as `Xception` (`config`, `forward_features`,
`forward_head`, `reset_classifier`, `num_features`, `min_input_size`, `block_names`), so
`xception info inception-v3-compact --size 28` describes it block by block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .layers import ConvBNAct, init_weights
from .model import BlockNet, ModelConfig, check_fits_in_memory

__all__ = ["InceptionV3Compact", "InceptionConfig"]


@dataclass(frozen=True)
class InceptionConfig(ModelConfig):
    """Everything that defines a compact Inception V3."""

    num_classes: int = 1000
    in_chans: int = 3
    width: float = 1.0  # multiplier on the paper's channel widths
    n: int = 7  # kernel length of the 1xn / nx1 factorised convs
    blocks: tuple[int, int, int] = (3, 4, 2)  # InceptionA, InceptionC, InceptionE modules
    bn_eps: float = 1e-3
    bn_momentum: float = 0.1
    drop_rate: float = 0.0

    _TUPLES = ("blocks",)

    def validate(self) -> None:
        super().validate()
        bad = self._bad
        if not isinstance(self.n, int) or self.n < 1 or self.n % 2 == 0:
            raise bad("n", "use an odd kernel length (7 in the paper)")
        # At most 25 of each: modules are lettered b..z after torchvision (mixed_5b, ...).
        if len(self.blocks) != 3 or any(
            not isinstance(b, int) or not 0 <= b <= 25 for b in self.blocks
        ):
            raise bad(
                "blocks", "use three counts from 0 to 25: (InceptionA, InceptionC, InceptionE)"
            )


class _Conv(ConvBNAct):
    """Conv -> BN -> ReLU with 'same' padding for any (kh, kw) kernel."""

    def __init__(self, cin: int, cout: int, kernel, cfg: InceptionConfig, stride: int = 1):
        kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
        super().__init__(cin, cout, (kh, kw), stride, (kh // 2, kw // 2),
                         bn_eps=cfg.bn_eps, bn_momentum=cfg.bn_momentum)  # fmt: skip


def _chain(cin: int, plan: list[tuple[int, object, int]], cfg: InceptionConfig) -> nn.Sequential:
    """Convs in sequence; `plan` is a list of (out channels, kernel, stride)."""
    layers = []
    for cout, kernel, stride in plan:
        layers.append(_Conv(cin, cout, kernel, cfg, stride))
        cin = cout
    return nn.Sequential(*layers)


class InceptionA(nn.Module):
    """The 35x35 module: 1x1, 1x1-3x3, 1x1-3x3-3x3 and avg pool-1x1 branches, concatenated."""

    def __init__(self, cin: int, pool_features: int, cfg: InceptionConfig) -> None:
        super().__init__()
        ch = cfg.channels
        self.branch1x1 = _Conv(cin, ch(64), 1, cfg)
        self.branch3x3 = _chain(cin, [(ch(48), 1, 1), (ch(64), 3, 1)], cfg)
        self.branch3x3dbl = _chain(cin, [(ch(64), 1, 1), (ch(96), 3, 1), (ch(96), 3, 1)], cfg)
        self.branch_pool = nn.Sequential(
            nn.AvgPool2d(3, 1, 1, count_include_pad=False), _Conv(cin, ch(pool_features), 1, cfg)
        )
        self.out_channels = ch(64) + ch(64) + ch(96) + ch(pool_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = (self.branch1x1, self.branch3x3, self.branch3x3dbl, self.branch_pool)
        return torch.cat([b(x) for b in branches], 1)


class ReductionA(nn.Module):
    """Grid reduction 35 -> 17 in the paper: 3x3/2, 1x1-3x3-3x3/2 and max pool, concatenated."""

    def __init__(self, cin: int, cfg: InceptionConfig) -> None:
        super().__init__()
        ch = cfg.channels
        self.branch3x3 = _Conv(cin, ch(384), 3, cfg, stride=2)
        self.branch3x3dbl = _chain(cin, [(ch(64), 1, 1), (ch(96), 3, 1), (ch(96), 3, 2)], cfg)
        self.branch_pool = nn.MaxPool2d(3, 2, 1)
        self.out_channels = ch(384) + ch(96) + cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = (self.branch3x3, self.branch3x3dbl, self.branch_pool)
        return torch.cat([b(x) for b in branches], 1)


class InceptionC(nn.Module):
    """The 17x17 module: 1x1, 1xn-nx1 and (nx1-1xn) x 2 factorised branches, avg pool-1x1."""

    def __init__(self, cin: int, c7: int, cfg: InceptionConfig) -> None:
        super().__init__()
        ch, n = cfg.channels, cfg.n
        c7, c192 = ch(c7), ch(192)
        self.branch1x1 = _Conv(cin, c192, 1, cfg)
        self.branch7x7 = _chain(cin, [(c7, 1, 1), (c7, (1, n), 1), (c192, (n, 1), 1)], cfg)
        self.branch7x7dbl = _chain(
            cin,
            [(c7, 1, 1), (c7, (n, 1), 1), (c7, (1, n), 1), (c7, (n, 1), 1), (c192, (1, n), 1)],
            cfg,
        )
        self.branch_pool = nn.Sequential(
            nn.AvgPool2d(3, 1, 1, count_include_pad=False), _Conv(cin, c192, 1, cfg)
        )
        self.out_channels = 4 * c192

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = (self.branch1x1, self.branch7x7, self.branch7x7dbl, self.branch_pool)
        return torch.cat([b(x) for b in branches], 1)


class ReductionB(nn.Module):
    """Grid reduction 17 -> 8 in the paper: 1x1-3x3/2, 1x1-1xn-nx1-3x3/2 and max pool."""

    def __init__(self, cin: int, cfg: InceptionConfig) -> None:
        super().__init__()
        ch, n = cfg.channels, cfg.n
        self.branch3x3 = _chain(cin, [(ch(192), 1, 1), (ch(320), 3, 2)], cfg)
        self.branch7x7x3 = _chain(
            cin, [(ch(192), 1, 1), (ch(192), (1, n), 1), (ch(192), (n, 1), 1), (ch(192), 3, 2)], cfg
        )
        self.branch_pool = nn.MaxPool2d(3, 2, 1)
        self.out_channels = ch(320) + ch(192) + cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = (self.branch3x3, self.branch7x7x3, self.branch_pool)
        return torch.cat([b(x) for b in branches], 1)


class InceptionE(nn.Module):
    """The 8x8 module: 1x1, 1x1-(1x3 | 3x1), 1x1-3x3-(1x3 | 3x1) expanded branches, pool-1x1."""

    def __init__(self, cin: int, cfg: InceptionConfig) -> None:
        super().__init__()
        ch = cfg.channels
        c384 = ch(384)
        self.branch1x1 = _Conv(cin, ch(320), 1, cfg)
        self.branch3x3_1 = _Conv(cin, c384, 1, cfg)
        self.branch3x3_2a = _Conv(c384, c384, (1, 3), cfg)
        self.branch3x3_2b = _Conv(c384, c384, (3, 1), cfg)
        self.branch3x3dbl_1 = _chain(cin, [(ch(448), 1, 1), (c384, 3, 1)], cfg)
        self.branch3x3dbl_2a = _Conv(c384, c384, (1, 3), cfg)
        self.branch3x3dbl_2b = _Conv(c384, c384, (3, 1), cfg)
        self.branch_pool = nn.Sequential(
            nn.AvgPool2d(3, 1, 1, count_include_pad=False), _Conv(cin, ch(192), 1, cfg)
        )
        self.out_channels = ch(320) + 4 * c384 + ch(192)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch3x3_1(x)
        b = self.branch3x3dbl_1(x)
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch3x3_2a(a),
                self.branch3x3_2b(a),
                self.branch3x3dbl_2a(b),
                self.branch3x3dbl_2b(b),
                self.branch_pool(x),
            ],
            1,
        )


class InceptionV3Compact(BlockNet):
    """Inception V3's topology for small images; see the module docstring."""

    small_images = True  # fed 28 px by default, as the compact Xception (`default_image_size`)

    def __init__(self, config: InceptionConfig | None = None, **overrides) -> None:
        super().__init__()
        cfg = InceptionConfig.of(config, overrides)
        check_fits_in_memory(InceptionV3Compact, cfg)
        self.config = cfg
        self.min_input_size = 1
        ch = cfg.channels
        # The paper's stem (3x3/2 32, 3x3 32, 3x3 64, pool, 1x1 80, 3x3 192, pool) takes 299 px
        # down to 35; here the first conv keeps the resolution and one pool halves it.
        # Blocks are named after torchvision's/Keras' Inception V3 (Mixed_5b ... Mixed_7c) and run
        # in `block_names` order, which `xception.model.summary` reads too.
        self.block_names: list[str] = []

        def add(name: str, block: nn.Module) -> None:
            self.add_module(name, block)
            self.block_names.append(name)

        # The paper's stem (3x3/2 32, 3x3 32, 3x3 64, pool, 1x1 80, 3x3 192, pool) takes 299 px
        # down to 35; here the first conv keeps the resolution, as the compact Xception's does.
        add("stem", _chain(cfg.in_chans, [(ch(32), 3, 1), (ch(32), 3, 1), (ch(64), 3, 1)], cfg))
        add("stem_pool", nn.MaxPool2d(3, 2, 1))
        add("stem2", _chain(ch(64), [(ch(80), 1, 1), (ch(192), 3, 1)], cfg))
        add("stem2_pool", nn.MaxPool2d(3, 2, 1))
        c = ch(192)
        letters = "bcdefghijklmnopqrstuvwxyz"
        for i in range(cfg.blocks[0]):
            add(f"mixed_5{letters[i]}", InceptionA(c, 32 if i == 0 else 64, cfg))
            c = self.get_submodule(self.block_names[-1]).out_channels
        add("mixed_6a", ReductionA(c, cfg))
        c = self.mixed_6a.out_channels
        for i in range(cfg.blocks[1]):
            # The paper's widths for the four 17x17 modules: 128, 160, 160, 192.
            add(f"mixed_6{letters[i]}", InceptionC(c, (128, 160, 160, 192)[min(i, 3)], cfg))
            c = self.get_submodule(self.block_names[-1]).out_channels
        add("mixed_7a", ReductionB(c, cfg))
        c = self.mixed_7a.out_channels
        for i in range(cfg.blocks[2]):
            add(f"mixed_7{letters[i]}", InceptionE(c, cfg))
            c = self.get_submodule(self.block_names[-1]).out_channels
        self.num_features = c
        self.global_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.fc_hidden = None  # no hidden Dense layers (an attribute `summary` reads)
        self.dropout = nn.Dropout(cfg.drop_rate) if cfg.drop_rate > 0 else None
        self.fc = nn.Linear(c, cfg.num_classes) if cfg.num_classes > 0 else None
        init_weights(self)

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A fresh classifier for `num_classes` classes (0 = none). `global_pool` is timm's
        argument: this model pools by average only, so 'avg' (or None) is all it takes."""
        if global_pool not in (None, "avg"):  # timm's call with '' or 'max' had a TypeError
            raise ValueError(
                f"reset_classifier(..., global_pool={global_pool!r}): the compact Inception V3 "
                "pools by average only; for unpooled maps call forward_features(x)"
            )
        self.config = self.config.replace(num_classes=num_classes)
        self._new_classifier(self.num_features, self.config.num_classes)  # an int, numpy's too
