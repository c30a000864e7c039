"""The device-side input of `train.py --input device`: no TensorFlow, and the
augmentation inside the compiled train step.

The host only gathers: `TrainingBatches` (a `keras.utils.PyDataset`) yields
batch `step`'s uint8 examples in the order of
`device_augment.batch_indices` (a NumPy `take`: 0.8 MB for 256 CIFAR images),
its labels, and the step. The compiled train step turns them into the
training batch with `DeviceAugmentation` (`device_augment.augment_and_mix`:
the recipe, MixUp and CutMix in `keras.ops`, keyed by `(seed, step)`), so the
images are augmented by the accelerator, whatever the number of host cores.

The training set is not held on the device as one array: under
`keras.distribution.DataParallel` every array of a batch is split along its
first axis over the devices, so a batch has to arrive as a batch.

A batch is the element `(images, labels, steps)`: Keras takes the third
element of a batch for its sample weights and passes it to the train step
untouched; `CrossEntropyModel` gives the whole element to its `batch_maker`,
a `DeviceAugmentation`, which reads the step from it. `steps` is the step
repeated once per example, so that it splits over the devices like the rest.
"""

import keras
import numpy as np

from nam_keras.data import device_augment

#: The recipes the device side has (`--augment`); RandAugment has no keyed form.
AUGMENTATIONS = tuple(device_augment.AUGMENTATIONS)


def one_hot(labels, num_classes):
    """Int class ids (N,) as float32 one-hot rows (N, num_classes), in NumPy."""
    return np.eye(num_classes, dtype="float32")[labels]


class TrainingBatches(keras.utils.PyDataset):
    """The endless uint8 training batches from global step `start_step` on.

    Item `i` is global step `start_step + i`: `(images uint8 (b, H, W, 3),
    labels, steps int32 (b,))`, with `b = batch_size / process_count` this
    process's part of the global batch (rows `process_index * b ...`), labels
    int32 class ids or float32 one-hot (`num_classes` wide) when `one_hot`.

    Args:
        images: the training images, uint8 (N, H, W, 3), in host memory.
        labels: their int class ids (N,).
        batch_size: the global batch.
        seed: the run's seed: the order is `device_augment.batch_indices`'s.
        start_step: the global step of item 0 (a resumed run's first step).
        num_classes: width of one-hot labels.
        one_hot: one-hot labels (MixUp, CutMix or label smoothing).
        process_index, process_count: this process of a multi-host run.
        **kwargs: `keras.utils.PyDataset`'s `workers`, `max_queue_size`, ...
    """

    def __init__(
        self,
        images,
        labels,
        batch_size,
        seed=0,
        start_step=0,
        num_classes=100,
        one_hot=False,
        process_index=0,
        process_count=1,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.images, self.labels = np.asarray(images), np.asarray(labels, dtype="int32")
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise ValueError(
                "images must be uint8 (N, height, width, channels); received "
                f"{self.images.dtype} {self.images.shape}."
            )
        if batch_size % process_count:
            raise ValueError(
                f"batch_size {batch_size} is not divisible by the {process_count} processes."
            )
        self.batch_size, self.seed, self.start_step = batch_size, seed, start_step
        self.num_classes, self.one_hot = num_classes, one_hot
        local = batch_size // process_count
        self.rows = slice(process_index * local, (process_index + 1) * local)
        self._passes = {}

    @property
    def num_batches(self):
        return None  # endless: `model.fit` takes `steps_per_epoch` batches an epoch

    def permutation(self, pass_index):
        """The order of pass `pass_index` (`device_augment.pass_permutation`),
        cached: the two latest passes are kept."""
        if pass_index not in self._passes:
            order = device_augment.pass_permutation(self.seed, pass_index, len(self.labels))
            self._passes = {p: o for p, o in self._passes.items() if p >= pass_index - 1} | {
                pass_index: keras.ops.convert_to_numpy(order)
            }
        return self._passes[pass_index]

    def indices(self, step):
        """The example indices of global step `step`: `device_augment.batch_indices`."""
        n = len(self.labels)
        positions = step * self.batch_size + np.arange(self.batch_size)
        passes, within = positions // n, positions % n
        index = np.empty(self.batch_size, dtype=np.int64)
        for p in np.unique(passes):
            index[passes == p] = self.permutation(int(p))[within[passes == p]]
        return index

    def __getitem__(self, i):
        step = self.start_step + i
        index = self.indices(step)[self.rows]
        labels = self.labels[index]
        if self.one_hot:
            labels = one_hot(labels, self.num_classes)
        return self.images[index], labels, np.full(len(index), step, dtype="int32")


class DeviceAugmentation:
    """The training batch of a `TrainingBatches` element, made in the train
    step: `device_augment.augment_and_mix` keyed by the run's `seed` and the
    element's step. `CrossEntropyModel.batch_maker` takes it.

    Args:
        seed: the run's seed.
        augment: the recipe (`AUGMENTATIONS`).
        mixup, cutmix: the alphas of MixUp and CutMix (0: off).
    """

    def __init__(self, seed=0, augment="reference", mixup=0.0, cutmix=0.0):
        if augment not in AUGMENTATIONS:
            raise ValueError(f"augment must be one of {AUGMENTATIONS}; received {augment!r}.")
        self.seed, self.augment, self.mixup, self.cutmix = seed, augment, mixup, cutmix

    def __call__(self, data):
        """`(images uint8, labels, steps)` -> `(images float32 in [0, 255], labels)`."""
        images, labels, steps = data
        return device_augment.augment_and_mix(
            images, labels, steps[0], self.seed, self.augment, self.mixup, self.cutmix
        )
