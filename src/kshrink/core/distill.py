"""Layer-wise knowledge distillation: the student learns the original model's block outputs as
well as its final outputs (TinyBERT, Jiao et al. 2020; FitNets before it).

Blocks are the top-level layers that end a residual stage: keras-hub `TransformerEncoder`s
(or the stock layers kshrink rebuilt one as, whose last layer keeps the block's name) and
`Add` layers. Teacher and student blocks are matched by name. A block the student no longer
has (depth pruning removed it) is skipped; the student block before such a gap learns the
output of the last teacher block in the gap, whose place it took (teacher blocks 0-5, student
keeps 0, 2, 4: 0 -> 1, 2 -> 3, 4 -> 5). Where a student block is narrower than its teacher's
(channels removed), a learned linear map (TinyBERT's W_h) widens it for the loss; the map is
dropped after training.

Losses are mean squared errors, averaged over real tokens when the model takes a
`padding_mask` input (padding would otherwise dominate short sentences); the block losses are
averaged over blocks and added to the output loss. The outputs are distilled as logits
(softened at a temperature) when the model is trained on class labels, by mean squared error
otherwise (an encoder without a head, or data without labels).

Keras' `keras.distillation.Distiller` runs the student twice per step when features are
distilled (once for the outputs, once for the features) and its losses see no padding mask;
`LayerwiseDistiller` runs each model once.
"""

from __future__ import annotations

import keras

from kshrink.layers.specs import is_add
from kshrink.layers.transformer import is_encoder

MASK_INPUT = "padding_mask"


def block_names(model: keras.Model) -> list[str]:
    """The names of `model`'s top-level blocks (transformer encoders and residual `Add`s), in
    graph order."""
    if isinstance(model, keras.Sequential) or not hasattr(model, "_operations"):
        return []
    return [layer.name for layer in model.layers
            if is_encoder(layer) or is_add(layer)]


def matched_blocks(teacher: keras.Model, student: keras.Model) -> list[tuple[str, str]]:
    """`(student block, teacher block)` pairs for feature distillation (see the module's
    docstring for the rule)."""
    names = block_names(teacher)
    present = {layer.name for layer in student.layers}
    kept = [i for i, name in enumerate(names) if name in present]
    pairs = []
    for n, i in enumerate(kept):
        target = kept[n + 1] - 1 if n + 1 < len(kept) else len(names) - 1
        pairs.append((names[i], names[target]))
    return pairs


class LayerwiseDistiller(keras.Model):
    """Trains `student` toward `teacher` on matched block outputs and on the final outputs.

    `fit` it like the student (inputs, and labels when there are any); the student's weights
    are what it trains, the teacher stays as it is.

    Args:
        teacher: the original model (not trained).
        student: the model to train, whose layers are shared with this distiller.
        pairs: `(student block, teacher block)` names, e.g. from `matched_blocks`.
        output_loss: `"mse"`, or a callable `(teacher outputs, student outputs) -> loss`
            for one output (e.g. softened logits).
        label_loss: the loss on labels, or None to learn from the teacher only.
        label_weight: the weight of `label_loss` when labels are given; the distillation
            losses share the rest.
    """

    def __init__(self, teacher: keras.Model, student: keras.Model, pairs, *, output_loss="mse",
                 label_loss=None, label_weight: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.teacher = teacher
        self.student = student
        self.teacher.trainable = False
        self._outputs = len(keras.tree.flatten(student.output))
        self._student_features = _with_blocks(student, [s for s, _ in pairs])
        self._teacher_features = _with_blocks(teacher, [t for _, t in pairs])
        n = self._outputs
        self.maps = []
        for (name, _), s, t in zip(pairs, self._student_features.outputs[n:],
                                   self._teacher_features.outputs[n:]):
            widen = None
            if t.shape[-1] != s.shape[-1]:  # built now: the optimizer must see its kernel
                widen = keras.layers.Dense(t.shape[-1], use_bias=False, name=f"map_{name}")
                widen.build(s.shape)
            self.maps.append(widen)
        self._output_loss = output_loss
        self._label_loss = label_loss
        self._label_weight = label_weight
        self._masked = _has_mask_input(student)

    def call(self, inputs, training=None):
        """The student's outputs followed by its matched block outputs (one flat list)."""
        return self._student_features(inputs, training=training)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        """The distillation loss (and the label loss when `y` is given)."""
        if y_pred is None:
            y_pred = self(x, training=training)
        targets = [keras.ops.stop_gradient(t)
                   for t in self._teacher_features(x, training=False)]
        mask = None
        if self._masked and isinstance(x, dict):
            mask = keras.ops.cast(x[MASK_INPUT], y_pred[0].dtype)
        n = self._outputs
        loss = 0.0
        for teacher_out, student_out in zip(targets[:n], y_pred[:n]):
            if self._output_loss == "mse":
                loss = loss + squared_error(teacher_out, student_out, mask)
            else:
                loss = loss + self._output_loss(teacher_out, student_out)
        if len(targets) > n:
            blocks = 0.0
            for target, feature, widen in zip(targets[n:], y_pred[n:], self.maps):
                if widen is not None:
                    feature = widen(feature)
                blocks = blocks + squared_error(target, feature, mask)
            loss = loss + blocks / (len(targets) - n)
        if self._label_loss is not None and y is not None and self._label_weight > 0:
            predicted = keras.tree.pack_sequence_as(self.student.output, y_pred[:n])
            loss = (self._label_weight * self._label_loss(y, predicted)
                    + (1 - self._label_weight) * loss)
        return loss


def squared_error(target, value, mask=None):
    """Mean squared error of `value` from `target`; over the positions `mask` (batch,
    positions) marks when the two are (batch, positions, ...)."""
    error = keras.ops.square(keras.ops.cast(value, target.dtype) - target)
    if mask is None or len(error.shape) < 3 or error.shape[1] != mask.shape[1]:
        return keras.ops.mean(error)
    error = keras.ops.mean(keras.ops.reshape(error, (*keras.ops.shape(error)[:2], -1)), axis=-1)
    return keras.ops.sum(error * mask) / keras.ops.maximum(keras.ops.sum(mask), 1.0)


def _with_blocks(model: keras.Model, names: list[str]) -> keras.Model:
    """A model sharing `model`'s layers that returns its outputs (flattened) and then the
    outputs of the layers `names`, taken from this model's own graph (a layer shared with an
    earlier version of the model has other outputs there, which `layer.output` returns)."""
    found = {}

    def record(layer, *args, **kwargs):
        outputs = layer(*args, **kwargs)
        found[layer.name] = outputs
        return outputs

    rebuilt = keras.models.clone_model(model, clone_function=lambda layer: layer,
                                       call_function=record)
    outputs = keras.tree.flatten(rebuilt.output) + [found[n] for n in names]
    return keras.Model(rebuilt.input, outputs, name=f"{model.name}_blocks")


def _has_mask_input(model: keras.Model) -> bool:
    inputs = model.input
    return isinstance(inputs, dict) and MASK_INPUT in inputs
