"""FastPatchCore: the deploy model's function, re-planned for a GPU. model.PatchCoreDeploy is its reference.

What changes, and why it keeps the outputs:
- the backbone runs in FP16, BF16, TF32 or FP32 (``backbone_dtype``), each BatchNorm folded into the
  convolution before it and, for timm ResNets, bias, ReLU and residual add fused (fused_resnet.py): inside
  cuDNN's convolution on the tensor cores, in channels-last; pooling, upsampling and everything after the
  backbone stay in FP32;
- the FP32 backbone (exact mode) runs in NCHW, cuDNN's FP32 layout (in channels-last each convolution was
  wrapped in two transposes), and calls cuDNN with its flags per call (fused_resnet.exact_conv): IEEE FP32,
  no TF32, deterministic algorithms from cuDNN's heuristics instead of timing-based autotuning, so the
  algorithm is the same in every process on a given GPU and cuDNN, whatever process-wide flags a host sets;
  bias, residual and ReLU follow in one Triton pass with the bits of the separate passes;
- the nearest-neighbour search is knn.nearest: FP16 tensor-core candidates, then an FP32 re-rank certified
  to be anomalib's FP32 search (``exact``), or not (``fast``); the argmax patch of each image, whose bank row
  picks the support set, is searched again over the whole bank in FP32;
- the image score's support set comes from a table of each bank row's neighbours built once (knn.BankIndex)
  instead of a search over the whole bank per image;
- nearest upsampling, reflect padding and the separable Gaussian blur are linear in the patch scores, so
  the map is ``A_h @ scores @ A_w^T`` with two small matrices built once per grid size by running those very
  operations on one-hot inputs in float64 (two tiny float64 products instead of a 33-tap convolution over the
  full-resolution map: float64 also keeps them off TF32, whatever ``torch.backends`` says).

No ``torch.backends`` flag is read on the way (the products that matter are Triton's, float64 or elementwise),
so nothing here flips process-wide state around a call.

Input: float32 [N, 3, H, W] in [0, 1] (``forward``) or uint8 [N, H, W, 3] (``forward_uint8``), on the model's
device. Output: model.DeployOutput, like the deploy model.
"""

from __future__ import annotations

import itertools
import warnings

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812
from torch.profiler import record_function

from patchcore_trt.gpu.fused_resnet import (
    FusedResNetFeatures,
    TritonConvAct,
    conv_act,
    exact_conv_act,
    fuse_resnet,
    triton_ready,
)
from patchcore_trt.gpu.knn import SEARCH_MODES, BankIndex, float32_matmul, nearest, rescan
from patchcore_trt.model import DeployOutput, PatchCoreDeploy
from patchcore_trt.spec import PatchCoreSpec

BACKBONE_DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# The FP32 backbone's convolutions: cuDNN's IEEE FP32, or the Triton implicit GEMMs with tl.dot's precision.
CONVOLUTIONS = ("cudnn", "tf32x3", "ieee")


@torch.no_grad()
def fold_batchnorm(module: nn.Module) -> nn.Module:
    """Fold every BatchNorm2d that directly follows a Conv2d (timm's ``convN``/``bnN`` pairs and ``[conv, bn]``
    sequences) into that convolution, in place. BatchNorms in any other position are left as they are."""
    for parent in module.modules():
        children = dict(parent.named_children())
        pairs = [(children.get("conv" + name[2:]), name) for name in children if name.startswith("bn")]
        if isinstance(parent, nn.Sequential):
            pairs += [(children[a], b) for a, b in itertools.pairwise(children)]
        for conv, bn_name in pairs:
            bn = children[bn_name]
            if not (isinstance(conv, nn.Conv2d) and type(bn) is nn.BatchNorm2d and bn.track_running_stats):
                continue
            gamma = bn.weight if bn.weight is not None else torch.ones_like(bn.running_var)
            beta = bn.bias if bn.bias is not None else torch.zeros_like(bn.running_mean)
            scale = gamma / torch.sqrt(bn.running_var + bn.eps)
            bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
            conv.weight.copy_(conv.weight * scale[:, None, None, None])
            conv.bias = nn.Parameter((bias - bn.running_mean) * scale + beta)
            setattr(parent, bn_name, nn.Identity())
    return module


class ExactConv2d(nn.Conv2d):
    """nn.Conv2d that, on CUDA, runs fused_resnet.exact_conv_act: IEEE FP32 (no TF32), no benchmarking and a
    deterministic algorithm asked for in the call itself, not through ``torch.backends``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_cuda or self.padding_mode != "zeros" or isinstance(self.padding, str):
            return super().forward(x)
        return exact_conv_act(self, x, relu=False)


def exact_convolutions(module: nn.Module) -> nn.Module:
    """Every plain nn.Conv2d in ``module`` becomes an ExactConv2d (same parameters), in place."""
    for conv in module.modules():
        if type(conv) is nn.Conv2d:
            conv.__class__ = ExactConv2d
    return module


def blur_matrix(taps: torch.Tensor, grid: int, size: int) -> torch.Tensor:
    """[size, grid]: nearest upsampling grid -> size, reflect padding and the 1-D blur, as one matrix.

    Built by running AnomalyMap's own operations on the ``grid`` one-hot columns, in float64.
    """
    pad = int(taps.numel() // 2)
    one_hot = torch.eye(grid, dtype=torch.float64).view(grid, 1, grid, 1)
    upsampled = F.interpolate(one_hot, size=(size, 1), mode="nearest")
    padded = F.pad(upsampled, (0, 0, pad, pad), mode="reflect")
    blurred = F.conv2d(padded, taps.to(torch.float64).view(1, 1, -1, 1))
    return blurred.view(grid, size).T.contiguous()


class SeparableMap(nn.Module):
    """model.AnomalyMap as ``A_h @ scores @ A_w^T``; the matrices are cached per patch-grid size."""

    def __init__(self, taps: torch.Tensor, size: tuple[int, int]) -> None:
        super().__init__()
        self.size = size
        self.taps = taps.detach().to(torch.float64).cpu()
        self._matrices: dict[tuple[int, int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}

    def forward(self, patch_scores: torch.Tensor) -> torch.Tensor:
        grid_h, grid_w = patch_scores.shape[-2:]
        key = (grid_h, grid_w, patch_scores.device)
        if key not in self._matrices:  # built during warm-up, never inside a CUDA graph capture
            self._matrices[key] = (
                blur_matrix(self.taps, grid_h, self.size[0]).to(patch_scores.device),
                blur_matrix(self.taps, grid_w, self.size[1]).T.contiguous().to(patch_scores.device),
            )
        rows, columns = self._matrices[key]
        return torch.matmul(torch.matmul(rows, patch_scores.double()), columns).float()


class FastPatchCore(PatchCoreDeploy):
    """The deploy model with its parts re-planned for speed (see the module docstring); ``forward`` and its
    post-processing are the deploy model's own.

    Args:
        spec: The fitted model.
        backbone_dtype: Backbone arithmetic: fp32 (IEEE), tf32, fp16 or bf16.
        search: ``exact`` (FP16 candidates + FP32 re-rank) or ``fast`` (FP16 distances).
        device: Where the model runs; the bank index is built there.
        map_at_input_size: Return the map at the input's H x W, as the deploy model's option does.
        neighbours: The bank's neighbour table, if already computed (knn.BankIndex).
        convolutions: The FP32 backbone's convolutions (``CONVOLUTIONS``): cuDNN, or conv_triton's kernels
            with ``tf32x3`` or ``ieee`` products (channels-last; Triton's interpreter off CUDA).
    """

    def __init__(
        self,
        spec: PatchCoreSpec,
        *,
        backbone_dtype: str = "fp16",
        search: str = "certified",
        device: torch.device | str = "cpu",
        map_at_input_size: bool = False,
        neighbours: torch.Tensor | None = None,
        convolutions: str = "cudnn",
    ) -> None:
        if backbone_dtype not in BACKBONE_DTYPES:
            raise ValueError(f"backbone_dtype must be one of {sorted(BACKBONE_DTYPES)}, got {backbone_dtype!r}")
        if convolutions not in CONVOLUTIONS or (convolutions != "cudnn" and backbone_dtype != "fp32"):
            raise ValueError(f"convolutions must be one of {CONVOLUTIONS} (not cudnn: fp32 only), got {convolutions!r}")
        if search not in SEARCH_MODES:
            raise ValueError(f"search must be one of {SEARCH_MODES}, got {search!r}")
        super().__init__(spec, map_at_input_size=map_at_input_size)
        self.backbone_dtype = backbone_dtype
        self.search_mode = search
        self.dtype = BACKBONE_DTYPES[backbone_dtype]
        self.preprocess.to(device)
        backbone = fold_batchnorm(self.backbone)
        # cuDNN's engines on the tensor cores are channels-last, its IEEE FP32 engines NCHW; the Triton
        # convolutions read channels-last (a network they cannot run keeps cuDNN's).
        convs = [module for module in backbone.modules() if isinstance(module, nn.Conv2d)]
        self.convolutions = convolutions if all(triton_ready(conv) for conv in convs) else "cudnn"
        self.memory_format = torch.contiguous_format if self.convolutions == "cudnn" else torch.channels_last
        fused = conv_act
        if backbone_dtype == "fp32":
            backbone = exact_convolutions(backbone)
            fused = exact_conv_act if self.convolutions == "cudnn" else TritonConvAct(self.convolutions)
        else:
            self.memory_format = torch.channels_last
        backbone = fuse_resnet(backbone, fused)
        self.backbone = backbone.to(device=device, dtype=self.dtype, memory_format=self.memory_format)
        del self.search  # the deploy model's chunked FP32 search; the index below replaces it
        self.index = BankIndex(spec.memory_bank, spec.num_neighbors, device, neighbours)
        self.anomaly_map = SeparableMap(spec.blur_kernel, spec.preprocess.model_size)

    def embed(self, normalized_images: torch.Tensor) -> torch.Tensor:
        """[N, 3, h, w] float32 -> [N, D, gh, gw] float32 (in ``memory_format``): PatchCoreDeploy.embed, backbone
        in ``backbone_dtype``, everything after it in FP32."""
        features = self.backbone(normalized_images.to(self.dtype, memory_format=self.memory_format))
        pooled = [self.pool(feature.float()) for feature in features]
        grid = pooled[0].shape[-2:]
        upsampled = [pooled[0]] + [F.interpolate(feature, size=grid, mode="bilinear") for feature in pooled[1:]]
        return torch.cat(upsampled, dim=1)

    @torch.no_grad()
    def check_fused_backbone(self, images: torch.Tensor) -> None:
        """Fall back to the plain folded backbone if cuDNN's fused convolutions disagree with it on ``images``.

        Run once per new input shape, before capture: a fused engine that computes garbage for some shape (seen
        for cuDNN's FP32 NCHW engines at batch 1), or that cuDNN cannot run for some shape (a RuntimeError), must
        cost speed, never correctness. The FP32 walk must give the plain walk's values exactly: its convolutions
        are the same calls, and its epilogue has the bits of the separate passes.
        """
        if not isinstance(self.backbone, FusedResNetFeatures):
            return
        normalized = self.preprocess(images).to(self.dtype, memory_format=self.memory_format)
        # Triton's FP32 convolutions sum in another order: 1e-6 of the norm, a broken kernel order 1.
        tolerance = 1e-2 if self.backbone_dtype != "fp32" else 0.0 if self.convolutions == "cudnn" else 1e-4
        try:
            with float32_matmul(conv_tf32=self.backbone_dtype == "tf32"):  # the engines forward will run
                agrees = self.backbone.agrees_with_plain(normalized, tolerance)
        except RuntimeError:  # no fused engine for this shape: the plain walk has one
            agrees = False
        if not agrees:
            warnings.warn(
                f"cuDNN's fused convolutions disagree at input {list(images.shape)}; running unfused", stacklevel=2
            )
            self.backbone = self.backbone.features

    def image_scores(self, distances: torch.Tensor, rows: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        """model.image_scores with the support set read from the neighbour table. [N, P], [N, P], [N, P, D] -> [N].

        The argmax patch's bank row is searched again over the whole bank in FP32 (one query per image): the
        row picks the support set, so the score would jump if it were ever wrong."""
        if self.num_neighbors == 1:
            return distances.amax(dim=1)
        max_patch = distances.argmax(dim=1, keepdim=True)
        score = distances.gather(1, max_patch).squeeze(1)
        max_feature = patches.gather(1, max_patch[..., None].expand(-1, -1, patches.shape[-1])).squeeze(1)
        everywhere = torch.ones_like(score, dtype=torch.bool)
        _, nearest_row = rescan(
            max_feature, max_feature.pow(2).sum(-1), everywhere, score, rows.gather(1, max_patch)[:, 0], self.index
        )
        support = self.index.neighbours[nearest_row]
        support_rows = self.index.bank[support]
        # anomalib's euclidean_dist term by term; elementwise, so no TF32 setting can reach it.
        dots = (support_rows * max_feature[:, None, :]).sum(dim=-1)
        squared = dots * -2 + max_feature.pow(2).sum(dim=-1, keepdim=True) + self.index.bank_sq[support]
        weights = 1 - F.softmax(squared.clamp_min(0).sqrt(), dim=1)[:, 0]
        return weights * score

    def raw_scores(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Un-normalised image scores [N] and maps [N, 1, h, w], as PatchCoreDeploy.raw_scores returns them."""
        return self.raw_scores_resized(self.preprocess.resize(images))

    def raw_scores_resized(self, resized: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``raw_scores`` of images already resized to the model's resolution (``preprocess.resize``)."""
        with record_function("preprocess"):
            normalized = self.preprocess.crop_and_normalize(resized)
        with record_function("backbone+embed"):
            embedding = self.embed(normalized)
        batch, dim, grid_h, grid_w = embedding.shape
        # Channels-last: this permute is a view, and patches is [N, P, D] without a copy (NCHW: one copy).
        patches = embedding.permute(0, 2, 3, 1).reshape(batch, grid_h * grid_w, dim)
        with record_function("search"):
            distances, rows = nearest(patches.reshape(-1, dim), self.index, self.search_mode)
            distances, rows = distances.view(batch, -1), rows.view(batch, -1)
        with record_function("score+map"):
            score = self.image_scores(distances, rows, patches)
            return score, self.anomaly_map(distances.view(batch, 1, grid_h, grid_w))

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> DeployOutput:
        return super().forward(images)

    @torch.no_grad()
    def forward_resized(self, resized: torch.Tensor, input_size: tuple[int, int]) -> DeployOutput:
        """``forward`` of images already resized to the model's resolution, ``input_size`` their size before."""
        return self.outputs(*self.raw_scores_resized(resized), input_size=input_size)

    def forward_uint8(self, images: torch.Tensor) -> DeployOutput:
        """uint8 [N, H, W, 3] (decoders' layout) -> the same outputs as ``forward(images / 255)`` in NCHW."""
        return self(images.permute(0, 3, 1, 2).float().div_(255))
