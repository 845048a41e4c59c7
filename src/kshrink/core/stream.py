"""Data that is not arrays in memory: a `tf.data.Dataset` (batched or not), a
`keras.utils.PyDataset`, a torch `DataLoader` or a Python generator of batches.

Fine-tuning streams it through `model.fit`, which takes all of these. Everything else a step
needs data for (calibration, the fidelity check, the loss to train with) reads the first
examples only, held as arrays: `Stream.head` draws them without reading the rest, and a
generator gives back what was drawn before `fit` reads on.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from kshrink.errors import KshrinkError

HEAD = 2048  # examples drawn into memory for calibration and checks, at most
HEAD_BYTES = 256 << 20  # and at most this much of them (about 430 RGB images at 224x224)


class Stream:
    """One data source that `model.fit` reads batch by batch.

    Args:
        source: the dataset, PyDataset, DataLoader or generator.
        steps_per_epoch: batches per epoch; needed for a generator or an infinite dataset,
            read from the source otherwise.
        unbatched: a `tf.data.Dataset` of single examples (batched for training).
    """

    def __init__(self, source, steps_per_epoch: int | None = None, unbatched: bool = False):
        self.source = source
        self.unbatched = unbatched
        self._drawn = []  # a generator's batches read by `head`, given back to `fit`
        self._steps = steps_per_epoch
        self._head = None

    def steps_per_epoch(self, batch_size: int) -> int:
        """Batches in one epoch of training at `batch_size` (for an unbatched dataset)."""
        if self._steps is not None:
            return self._steps
        if _is_tf_dataset(self.source):
            count = int(self.source.cardinality())
            if count > 0:
                return math.ceil(count / batch_size) if self.unbatched else count
        elif hasattr(self.source, "__len__"):
            return len(self.source)
        raise KshrinkError("data is a stream of unknown length (a generator or an infinite "
                           "dataset): give FineTune(steps_per_epoch=...) the batches per epoch")

    def for_fit(self, batch_size: int, split_over: int = 1):
        """What `model.fit` reads: `(source, steps_per_epoch)`, the source batched if it was
        not.

        `split_over`: the devices of JAX data-parallel training, which need every batch to
        split evenly over them. A batch that does not (a dataset's last one) is left out.
        """
        steps = self.steps_per_epoch(batch_size)
        if self.unbatched:
            source = self.source.batch(batch_size)
        elif self._drawn:
            drawn, self._drawn = self._drawn, []
            # `fit` takes generators, not other iterators.
            source = (batch for batch in itertools.chain(drawn, self.source))
        else:
            source = self.source
        if split_over == 1:
            return source, steps
        if _is_tf_dataset(source):
            import tensorflow as tf

            def splits(*batch):
                return tf.shape(tf.nest.flatten(batch)[0])[0] % split_over == 0

            # A finite dataset ends its epoch when it runs out: no step count to miss.
            return source.filter(splits), self._steps
        if not self.once:  # a PyDataset or DataLoader: read again each pass, endlessly
            source = (batch for _ in itertools.count() for batch in self.batches())
        return (batch for batch in source if _count(batch) % split_over == 0), steps

    def head(self, limit: int = HEAD):
        """The first `limit` examples (or all there are, or as many as fit in `HEAD_BYTES`)
        as arrays: `(x, y)`, or `x` for a source of inputs only. `x` is an array, or a dict
        of them. Drawn once."""
        if self._head is not None and self._head[0] >= limit:
            return _take(self._head[1], limit)
        parts, count, size = [], 0, 0
        for batch in self.batches():
            batch = _to_numpy(batch)
            parts.append(batch)
            count += _count(batch)
            size += sum(part.nbytes for part in _leaves(batch))
            if count >= limit or size >= HEAD_BYTES:
                break
        if not parts:
            raise KshrinkError("data holds no examples")
        self._head = (limit, _take(_concatenate(parts), limit))
        return self._head[1]

    @property
    def once(self) -> bool:
        """Whether the source can be read only once (a generator)."""
        return _is_generator(self.source)

    def batches(self):
        """The source's batches as they come (a generator's are kept for `for_fit`)."""
        if self.unbatched:
            yield from self.source.batch(256)
        elif _is_generator(self.source):
            for batch in self.source:
                self._drawn.append(batch)
                yield batch
        elif hasattr(self.source, "__getitem__") and hasattr(self.source, "__len__"):
            for i in range(len(self.source)):  # a PyDataset
                yield self.source[i]
        else:
            yield from self.source


def as_stream(data, model=None, steps_per_epoch: int | None = None) -> Stream | None:
    """`data` as a `Stream`, or None for arrays (`(x, y)`, `x`, dicts of arrays)."""
    if data is None or isinstance(data, (np.ndarray, dict)):
        return None
    if isinstance(data, (tuple, list)):
        return None
    if _is_tf_dataset(data):
        return Stream(data, steps_per_epoch, unbatched=_unbatched(data, model))
    if _is_generator(data) or hasattr(data, "__iter__") or hasattr(data, "__getitem__"):
        return Stream(data, steps_per_epoch)
    return None


def _is_tf_dataset(data) -> bool:
    return type(data).__module__.startswith("tensorflow") and hasattr(data, "element_spec")


def _is_generator(data) -> bool:
    return hasattr(data, "__next__") and hasattr(data, "__iter__")


def _unbatched(dataset, model) -> bool:
    """Whether a dataset's elements are single examples: their inputs have one axis fewer
    than the model's inputs (which count the batch axis)."""
    if model is None:
        return False
    spec = dataset.element_spec
    inputs = spec[0] if isinstance(spec, tuple) else spec
    first = next(iter(inputs.values())) if isinstance(inputs, dict) else (
        inputs[0] if isinstance(inputs, (list, tuple)) else inputs)
    return len(first.shape) == len(model.inputs[0].shape) - 1


def _to_numpy(batch):
    if isinstance(batch, dict):
        return {k: _to_numpy(v) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return tuple(_to_numpy(v) for v in batch)
    if hasattr(batch, "detach"):  # a torch tensor
        return batch.detach().cpu().numpy()
    return np.asarray(batch)


def _leaves(batch):
    if isinstance(batch, dict):
        return [v for value in batch.values() for v in _leaves(value)]
    if isinstance(batch, tuple):
        return [v for value in batch for v in _leaves(value)]
    return [batch]


def _first(batch):
    if isinstance(batch, dict):
        return next(iter(batch.values()))
    if isinstance(batch, tuple):
        return _first(batch[0])
    return batch


def _count(batch) -> int:
    return len(_first(batch))


def _concatenate(parts):
    head = parts[0]
    if isinstance(head, dict):
        return {k: _concatenate([p[k] for p in parts]) for k in head}
    if isinstance(head, tuple):
        return tuple(_concatenate([p[i] for p in parts]) for i in range(len(head)))
    return np.concatenate(parts)


def _take(values, limit: int):
    if isinstance(values, dict):
        return {k: _take(v, limit) for k, v in values.items()}
    if isinstance(values, tuple):  # (x,), (x, y) or (x, y, sample weights)
        taken = tuple(_take(v, limit) for v in values[:2])
        return taken[0] if len(taken) == 1 else taken
    return values[:limit]
