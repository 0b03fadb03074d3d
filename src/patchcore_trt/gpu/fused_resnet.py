"""timm ResNet features with each convolution's bias, residual add and ReLU inside the convolution's call.

After fast_model.fold_batchnorm a bottleneck block is conv+bias, ReLU, conv+bias, ReLU, conv+bias,
+shortcut, ReLU. Eager PyTorch runs each conv, then a bias-add kernel, a ReLU kernel and an add kernel, each
one more pass over the activations (a sixth of the FP16 backbone's GPU time at batch 16, in the profile).
cuDNN's fused convolutions (``torch.cudnn_convolution_relu`` and ``torch.cudnn_convolution_add_relu``:
act(conv(x, w) + z + bias)) do all of it in the convolution's epilogue (``conv_act``).

The FP32 backbone (exact mode) keeps cuDNN's IEEE FP32 convolution and does the rest in one Triton pass
(``exact_conv_act``, conv_triton.epilogue) whose bits are those of the separate passes: cuDNN's fused FP32
engines are NCHW-only, slower at batch 16 on an H100 and wrong at batch 1 (benchmarks/backbone_error.py).

The same walk runs with plain operations off CUDA, so it is tested on the CPU against timm's own forward.
Networks that are not plain timm ResNets (other blocks, attention, anti-aliasing, ...) are left as they are.
"""

from __future__ import annotations

import torch
from timm.models.resnet import BasicBlock, Bottleneck
from torch import nn
from torch.nn import functional as F  # noqa: N812

_STEM = ("conv1", "bn1", "act1", "maxpool")
_STAGES = ("layer1", "layer2", "layer3", "layer4")


def exact_conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """cuDNN's convolution without bias, asking in the call itself (``torch.cudnn_convolution``'s arguments, not
    ``torch.backends``) for IEEE FP32 (no TF32), no benchmarking and a deterministic algorithm: the algorithm
    comes from cuDNN's heuristics, the same in every process on a given GPU and cuDNN."""
    geometry = (conv.padding, conv.stride, conv.dilation, conv.groups)
    return torch.cudnn_convolution(x, conv.weight, *geometry, False, True, False)  # benchmark, deterministic, tf32


def exact_conv_act(
    conv: nn.Conv2d, x: torch.Tensor, residual: torch.Tensor | None = None, relu: bool = True
) -> torch.Tensor:
    """[relu]((conv(x) + bias) [+ residual]) in IEEE FP32: ``exact_conv`` and one Triton pass on CUDA, the same
    bits as separate bias, add and ReLU passes; plain operations elsewhere."""
    if not x.is_cuda:
        out = F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
        out = out if residual is None else out + residual
        return F.relu(out) if relu else out
    from patchcore_trt.gpu.conv_triton import epilogue  # Triton only where a GPU runs the backbone

    return epilogue(exact_conv(conv, x), conv.bias, residual, relu)


class TritonConvAct:
    """[relu]((conv(x) + bias) [+ residual]) by conv_triton.conv2d (implicit GEMM, the epilogue in the kernel),
    its products in ``precision`` (``tl.dot``'s input_precision). Runs on CUDA, or on the CPU in Triton's
    interpreter; needs square strides and padding, no dilation, no groups (timm ResNets' convolutions)."""

    def __init__(self, precision: str) -> None:
        self.precision = precision

    def __call__(
        self, conv: nn.Conv2d, x: torch.Tensor, residual: torch.Tensor | None = None, relu: bool = True
    ) -> torch.Tensor:
        from patchcore_trt.gpu.conv_triton import ConvConfig, conv2d, pack_weight

        packed = conv.__dict__.get("packed_weight")
        if packed is None or packed.device != conv.weight.device:  # packed once, during warm-up
            packed = conv.packed_weight = pack_weight(conv.weight)
        config = ConvConfig(precision=self.precision)
        return conv2d(x, packed, conv.kernel_size, conv.bias, residual, relu, conv.stride[0], conv.padding[0], config)


def triton_ready(conv: nn.Conv2d) -> bool:
    """Whether TritonConvAct can run ``conv``."""
    square = conv.stride[0] == conv.stride[1] and conv.padding[0] == conv.padding[1]
    return square and conv.dilation == (1, 1) and conv.groups == 1


def conv_act(conv: nn.Conv2d, x: torch.Tensor, residual: torch.Tensor | None = None, relu: bool = True) -> torch.Tensor:
    """relu(conv(x) + bias [+ residual]) in one cuDNN call on CUDA; without ``relu``, conv(x) + bias."""
    geometry = (conv.stride, conv.padding, conv.dilation, conv.groups)
    if not relu:
        return F.conv2d(x, conv.weight, conv.bias, *geometry)
    if x.is_cuda:
        if residual is None:
            return torch.cudnn_convolution_relu(x, conv.weight, conv.bias, *geometry)
        return torch.cudnn_convolution_add_relu(x, conv.weight, residual, 1.0, conv.bias, *geometry)
    out = F.conv2d(x, conv.weight, conv.bias, *geometry)
    return F.relu(out if residual is None else out + residual)


def _plain_conv(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and module.padding_mode == "zeros" and isinstance(module.padding, tuple)


def _fusable(block: nn.Module) -> bool:
    convs = ("conv1", "conv2", "conv3") if isinstance(block, Bottleneck) else ("conv1", "conv2")
    if not isinstance(block, (Bottleneck, BasicBlock)) or not all(_plain_conv(getattr(block, c)) for c in convs):
        return False
    identity = [getattr(block, name, None) for name in ("bn1", "bn2", "bn3", "drop_block", "aa", "drop_path")]
    if not all(module is None or isinstance(module, nn.Identity) for module in identity) or block.se is not None:
        return False
    acts = [getattr(block, name) for name in ("act1", "act2", "act3") if hasattr(block, name)]
    down = block.downsample
    plain_down = down is None or (
        isinstance(down, nn.Sequential) and _plain_conv(down[0]) and all(isinstance(m, nn.Identity) for m in down[1:])
    )
    return plain_down and all(type(act) is nn.ReLU for act in acts)


class FusedResNetFeatures(nn.Module):
    """The features of a BatchNorm-folded timm ResNet ``features_only`` network, each convolution with its bias,
    residual and ReLU run by ``fused`` (``conv_act``, ``exact_conv_act`` for IEEE FP32, or a TritonConvAct)."""

    def __init__(self, features: nn.Module, fused=conv_act) -> None:
        super().__init__()
        self.features = features
        self.fused = fused
        self.return_layers = list(features.return_layers)

    def _block(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if block.downsample is None else self.fused(block.downsample[0], x, relu=False)
        out = self.fused(block.conv1, x)
        if isinstance(block, Bottleneck):
            out = self.fused(block.conv2, out)
        last = block.conv3 if isinstance(block, Bottleneck) else block.conv2
        return self.fused(last, out, shortcut)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        net = self.features
        outputs = []
        x = self.fused(net.conv1, x)
        if "act1" in self.return_layers:
            outputs.append(x)
        x = net.maxpool(x)
        for name in _STAGES:
            if len(outputs) == len(self.return_layers):
                break
            for block in getattr(net, name):
                x = self._block(block, x)
            if name in self.return_layers:
                outputs.append(x)
        return outputs

    def agrees_with_plain(self, x: torch.Tensor, tolerance: float = 1e-2) -> bool:
        """Whether the fused walk gives the plain module's features on ``x`` (rounding apart: FP16/BF16 differ
        by about 1e-3 of the norm, a broken engine by order 1); ``tolerance`` 0 asks for equal values."""
        fused, plain = self(x), self.features(x)
        if tolerance == 0:
            return all(torch.equal(f, p) for f, p in zip(fused, plain, strict=True))
        return all(_relative_difference(f, p) <= tolerance for f, p in zip(fused, plain, strict=True))


def _relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def fuse_resnet(features: nn.Module, fused=conv_act) -> nn.Module:
    """``features`` with fused convolutions (``fused``) if it is a folded timm ResNet, else ``features``."""
    children = [name for name, _ in features.named_children()]
    if children[: len(_STEM)] != list(_STEM) or any(name not in _STEM + _STAGES for name in children):
        return features
    if not (_plain_conv(features.conv1) and isinstance(features.bn1, nn.Identity) and type(features.act1) is nn.ReLU):
        return features
    if not hasattr(features, "return_layers") or not set(features.return_layers) <= {"act1", *_STAGES}:
        return features
    blocks = [block for name in children if name in _STAGES for block in getattr(features, name)]
    return FusedResNetFeatures(features, fused) if all(_fusable(block) for block in blocks) else features
