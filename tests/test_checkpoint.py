"""Reading real anomalib checkpoints, and the one-line errors for everything that is not one."""

from __future__ import annotations

import fractions
import math

import pytest
import torch

from patchcore_trt.checkpoint import read_checkpoint
from patchcore_trt.errors import UserError


def _raw(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def test_spec_mirrors_the_checkpoint(resnet18_checkpoint):
    spec = read_checkpoint(resnet18_checkpoint)
    raw = _raw(resnet18_checkpoint)
    state = raw["state_dict"]
    assert spec.backbone == "resnet18"
    assert spec.layers == ("layer2", "layer3")
    assert spec.num_neighbors == raw["hyper_parameters"]["num_neighbors"]
    torch.testing.assert_close(spec.memory_bank, state["model.memory_bank"])
    assert spec.embedding_dim == 128 + 256
    assert spec.preprocess.model_size == (256, 256)
    assert spec.preprocess.antialias is True
    assert spec.postprocess.image_threshold == pytest.approx(float(state["post_processor._image_threshold"]))
    assert spec.postprocess.pixel_max == pytest.approx(float(state["post_processor.pixel_max"]))
    assert spec.postprocess.normalized_image_threshold == 0.5
    kernel = state["model.anomaly_map_generator.blur.kernel"][0, 0]
    torch.testing.assert_close(torch.outer(spec.blur_kernel, spec.blur_kernel), kernel)
    assert len(spec.source_sha256) == 64


def test_image_size_comes_from_the_checkpoint(trained):
    assert read_checkpoint(trained("resnet18", 320)).preprocess.model_size == (320, 320)


def _error(path, **kwargs) -> str:
    with pytest.raises(UserError) as info:
        read_checkpoint(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_file(tmp_path):
    assert "no such file" in _error(tmp_path / "nope.ckpt")


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.ckpt"
    path.write_text("hello")
    assert "not a PyTorch checkpoint" in _error(path)


def test_truncated_checkpoint(resnet18_checkpoint, tmp_path):
    path = tmp_path / "cut.ckpt"
    path.write_bytes(resnet18_checkpoint.read_bytes()[:200_000])
    assert "truncated or corrupt" in _error(path)


def test_not_patchcore(tmp_path):
    path = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"model.encoder.weight": torch.ones(2)}, "hyper_parameters": {}}, path)
    assert "not a PatchCore checkpoint" in _error(path)


def test_no_state_dict(tmp_path):
    path = tmp_path / "weights.ckpt"
    torch.save({"weight": torch.ones(2)}, path)
    assert "not a Lightning checkpoint" in _error(path)


def _modified(resnet18_checkpoint, tmp_path, name, change):
    raw = _raw(resnet18_checkpoint)
    change(raw)
    path = tmp_path / name
    torch.save(raw, path)
    return path


def test_unfitted_model(resnet18_checkpoint, tmp_path):
    path = _modified(
        resnet18_checkpoint,
        tmp_path,
        "unfitted.ckpt",
        lambda raw: raw["state_dict"].update({"model.memory_bank": torch.empty(0)}),
    )
    assert "never fitted" in _error(path)


def test_never_validated(resnet18_checkpoint, tmp_path):
    def drop_stats(raw):
        for key in ("image_min", "image_max", "pixel_min", "pixel_max"):
            raw["state_dict"][f"post_processor.{key}"] = torch.tensor(math.nan)

    assert "never validated" in _error(_modified(resnet18_checkpoint, tmp_path, "raw.ckpt", drop_stats))


def test_pickled_code_is_refused_by_default(resnet18_checkpoint, tmp_path):
    path = _modified(
        resnet18_checkpoint, tmp_path, "pickled.ckpt", lambda raw: raw.update(extra=fractions.Fraction(1, 3))
    )
    message = _error(path)
    assert "--trust-pickled-code" in message and "Fraction" in message
    # The explicit opt-in loads the same file.
    assert read_checkpoint(path, trust_pickled_code=True).backbone == "resnet18"


def _with_transform(resnet18_checkpoint, tmp_path, transforms):
    spec = {"class_path": "torchvision.transforms.v2.Compose", "init_args": {"transforms": transforms}}
    return _modified(
        resnet18_checkpoint, tmp_path, "t.ckpt", lambda raw: raw["anomalib_pre_processor_config"].update(transform=spec)
    )


def _resize(size):
    return {"class_path": "torchvision.transforms.v2.Resize", "init_args": {"size": size, "antialias": True}}


def _crop(size):
    return {"class_path": "torchvision.transforms.v2.CenterCrop", "init_args": {"size": size}}


def test_shorter_side_resize_is_refused_not_squashed(resnet18_checkpoint, tmp_path):
    path = _with_transform(resnet18_checkpoint, tmp_path, [_resize([256])])
    assert "resizes the shorter side" in _error(path)


def test_center_crop_is_read(resnet18_checkpoint, tmp_path):
    spec = read_checkpoint(_with_transform(resnet18_checkpoint, tmp_path, [_resize([256, 256]), _crop([224])]))
    assert spec.preprocess.model_size == (224, 224)


def test_crop_larger_than_resize_is_refused(resnet18_checkpoint, tmp_path):
    path = _with_transform(resnet18_checkpoint, tmp_path, [_resize([256, 256]), _crop([300, 300])])
    assert "larger than the resize" in _error(path)
