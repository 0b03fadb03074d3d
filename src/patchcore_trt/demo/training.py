"""Train a real anomalib PatchCore checkpoint on a folder data set (for the demo and the tests).

anomalib does the training; this module only wires its Folder data module and Engine with settings that
work offline (no pretrained weights can be downloaded here) and on a small CPU machine.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from patchcore_trt.errors import MissingDependencyError
from patchcore_trt.synthetic_data import SyntheticDataset

_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
_RANK_ZERO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


@dataclass(frozen=True)
class TrainSettings:
    backbone: str = "wide_resnet50_2"
    layers: tuple[str, ...] = ("layer2", "layer3")
    image_size: tuple[int, int] = (256, 256)
    coreset_sampling_ratio: float = 0.1
    num_neighbors: int = 9
    pre_trained: bool = False
    seed: int = 0


def _return_large_frees_to_the_os() -> None:
    """Serve allocations over 1 MiB with mmap (what MALLOC_MMAP_THRESHOLD_=1048576 does at start-up).

    Otherwise glibc keeps the coreset step's freed buffers in its heap and training can grow past 20 GB.
    """
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to tune
        ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, 1 << 20)


def train_patchcore(dataset: SyntheticDataset, work_dir: Path, settings: TrainSettings = TrainSettings()) -> Path:
    """Fit anomalib PatchCore on ``dataset`` and return the path of the Lightning checkpoint it saved.

    The validation split (half of the test images) sets anomalib's thresholds and min/max statistics, so
    the checkpoint carries real post-processing values.
    """
    _return_large_frees_to_the_os()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    chatter = io.StringIO()
    try:
        # anomalib and timm warn about their own deprecations on import; nothing a user can act on.
        with warnings.catch_warnings(), contextlib.redirect_stderr(chatter):
            warnings.simplefilter("ignore")
            import torch
            from anomalib.data import Folder
            from anomalib.engine import Engine
            from anomalib.models import Patchcore
            from lightning.pytorch import seed_everything
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise MissingDependencyError("anomalib", "anomalib") from exc

    seed_everything(settings.seed, verbose=False)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    datamodule = Folder(
        name="synthetic",
        root=dataset.root,
        normal_dir="train/good",
        abnormal_dir="test/defect",
        normal_test_dir="test/good",
        mask_dir="ground_truth/defect",
        train_batch_size=8,
        eval_batch_size=8,
        num_workers=0,
        seed=settings.seed,
    )
    model = Patchcore(
        backbone=settings.backbone,
        layers=list(settings.layers),
        pre_trained=settings.pre_trained,
        coreset_sampling_ratio=settings.coreset_sampling_ratio,
        num_neighbors=settings.num_neighbors,
        pre_processor=Patchcore.configure_pre_processor(image_size=settings.image_size),
        visualizer=False,
    )
    engine = Engine(
        default_root_dir=str(work_dir),
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    # Lightning and anomalib narrate on stderr (device tips, a tqdm bar per coreset); the caller shows progress.
    for name in ("lightning.pytorch", "lightning.fabric", "anomalib", *_RANK_ZERO_LOGGERS):
        logging.getLogger(name).setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stderr(chatter):
        warnings.simplefilter("ignore")
        engine.fit(model=model, datamodule=datamodule)
    checkpoint = (
        engine.trainer.checkpoint_callback.best_model_path or engine.trainer.checkpoint_callback.last_model_path
    )
    if not checkpoint:
        checkpoint = str(Path(work_dir) / "model.ckpt")
        engine.trainer.save_checkpoint(checkpoint)
    return Path(checkpoint)
