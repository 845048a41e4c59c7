"""Weight sharing: the `cluster` technique (k-means over each kernel's values).

After clustering a kernel holds only its centroid values (one set per layer, or per output
channel), which the compact file stores as a small codebook plus short indices. During
fine-tuning the centroids are the trainable parameters: each weight reads its centroid, so the
gradients of all weights of a cluster add up on that centroid (Deep Compression's trained
quantization). Zeros left by pruning stay zero and take no cluster (`preserve_sparsity`).
"""

from __future__ import annotations

import dataclasses
import math

import keras
import numpy as np

from kshrink.cluster.kmeans import INITS, kmeans_1d
from kshrink.core.classes import is_user_class
from kshrink.core.data import model_inputs
from kshrink.core.graph import copy_model, leaf_layers, owner_of, path_of, replace_layers
from kshrink.core.progress import within
from kshrink.layers.quantized import quantization
from kshrink.layers.specs import as_matrix, from_matrix, kernel_specs
from kshrink.core.select import Select, shared_level
from kshrink.core.options import (
    Flag,
    Int,
    OneOf,
    Overrides,
    calibration_option,
    option,
    selection,
)
from kshrink.core.technique import (
    Handler,
    LayerOverride,
    Stage,
    StepContext,
    Technique,
    register_technique,
)
from kshrink.errors import KshrinkError
from kshrink.layers.wrappers import ClusterWrapper
from kshrink.reconstruct import calibration_inputs, input_energy, reconstruct, unsupported
from kshrink.layers.rows import matrix_axes
from kshrink.reconstruct.solvers import (
    energy_matrix,
    gptq_codebook,
    grouped,
    refit_centroids,
    ungrouped,
)

GRANULARITIES = ("layer", "channel")
METHODS = ("kmeans", "gptq")


def cluster_kernel(values: np.ndarray, axes: tuple, config: Cluster,
                   importance: np.ndarray | None = None):
    """k-means of one kernel: (centroids [groups, k], flat assignment, keep mask).

    `importance`, in the kernel's matrix view, weighs each value's error (its input's
    energy on calibration data)."""
    matrix = as_matrix(values, axes)
    keep = np.ones_like(matrix) if not config.preserve_sparsity else (matrix != 0).astype(
        matrix.dtype)
    columns = [matrix] if config.granularity == "layer" else [
        matrix[:, [c]] for c in range(matrix.shape[1])]
    centroids = np.zeros((len(columns), config.clusters), dtype=np.float32)
    assignment = np.zeros(matrix.shape, dtype=np.int32)
    for g, column in enumerate(columns):
        live = keep if config.granularity == "layer" else keep[:, [g]]
        chosen = live > 0
        weights = None
        if importance is not None:
            weights = (importance if config.granularity == "layer" else importance[:, [g]])
            weights = weights[chosen]
        found, labels = (kmeans_1d(column[chosen], config.clusters, config.init,
                                   weights=weights)
                         if chosen.any() else (np.zeros(1, np.float32), np.zeros(0, np.int32)))
        centroids[g, : len(found)] = found
        centroids[g, len(found):] = found[-1]  # fewer distinct values than clusters
        flat = np.zeros(column.shape, dtype=np.int32)
        flat[chosen] = labels + g * config.clusters
        if config.granularity == "layer":
            assignment = flat
        else:
            assignment[:, [g]] = flat
    shape = values.shape
    return centroids, from_matrix(assignment, shape, axes), from_matrix(keep, shape, axes)


def _skip_reason(layer) -> str | None:
    if quantization(layer):
        return "quantized layers keep their weights"
    if not kernel_specs(layer):
        return f"{type(layer).__name__}: no kernel to share" + (
            "; register a LayerSpec naming its kernels (kshrink.layers.register_spec)"
            if is_user_class(type(layer)) else "")
    return None


SIZE_LEVELS = (256, 64, 16, 8, 4)  # the cluster counts the size search offers each layer


@dataclasses.dataclass
class ClusterState:
    """What a cluster step carries from `prepare` to `finalize`, by layer path."""

    solved: set[str] = dataclasses.field(default_factory=set)  # codebooks from a GPTQ sweep
    weighted: set[str] = dataclasses.field(default_factory=set)  # by input energy


class ClusterHandler(Handler):
    """Runs `Cluster`: wraps the chosen layers, shares their weights, strips the wrappers."""

    trains = True
    settles = True
    State = ClusterState

    def size_levels(self, model, config: Cluster) -> dict:
        chosen = StepContext(original=model).choose_layers(
            model, config.layers, config.exclude, _skip_reason, in_place=lambda layer: True)
        return {path_of(layer): SIZE_LEVELS for layer in chosen}

    def size_bits(self, config: Cluster, level: int) -> float:
        return math.log2(level)  # an index per value

    def size_table_bytes(self, config: Cluster, level: int, channels: int) -> float:
        return 4.0 * level * (channels if config.granularity == "channel" else 1)

    def size_probe(self, config: Cluster, trains: bool) -> Cluster:
        # Fine-tuned candidates cluster by k-means (the method follows from whether
        # fine-tuning comes after), and so must the probe that stands in for them.
        return dataclasses.replace(config, method="kmeans") \
            if trains and config.method is None else config

    def size_step(self, config: Cluster, levels: dict, trains: bool) -> Cluster:
        main, others = shared_level(levels, depth=lambda count: -count)
        return dataclasses.replace(
            config, clusters=main, layers=Select(names=tuple(sorted(levels))), exclude=None,
            overrides=tuple(ClusterOverride(layers=layers, clusters=count)
                            for count, layers in others))

    def prepare(self, model, config: Cluster, ctx: StepContext):
        # Without training, the layers a container builds take their centroids in place;
        # training the centroids needs a wrapper, which those layers cannot have.
        in_place = (lambda layer: True) if ctx.train_steps is None else None
        chosen = ctx.choose_layers(model, config.layers, config.exclude, _skip_reason, in_place,
                                   "a cluster step without fine-tuning shares it where it "
                                   "stands")
        if not chosen:
            raise ctx.nothing_left("cluster", "cluster")
        weighted = config.weighted
        if weighted is None:  # measured: helps per-channel codebooks, not per-layer ones
            weighted = ctx.data is not None and config.granularity == "channel"
        if weighted and ctx.data is None:
            raise KshrinkError("cluster: weighted=true needs calibration data: pass data=(x, y) "
                               "(or just x) to compress")
        wrapped = [layer for layer in chosen if not owner_of(layer)]
        method = config.method or (
            "gptq" if ctx.data is not None and ctx.train_steps is None else "kmeans")
        solved = _share_by_reconstruction(model, wrapped, config, ctx) \
            if method == "gptq" else set()
        importance = (input_energy(model, model_inputs(ctx.data, config.calibration_samples),
                                   wrapped) if weighted and method == "kmeans" else {})
        ctx.state.solved = {path_of(l) for l in wrapped if l.name in solved}
        ctx.state.weighted = {path_of(l) for l in wrapped if l.name in importance}
        for layer in chosen:
            if owner_of(layer):
                self._share_in_place(layer, config.for_layer(layer), ctx)
        wrappers = {id(layer): self._wrap(layer, config.for_layer(layer),
                                          importance.get(layer.name))
                    for layer in wrapped}
        return replace_layers(model, lambda l: wrappers.get(id(l), l))

    @staticmethod
    def _share_in_place(layer, config: Cluster, ctx: StepContext) -> None:
        distinct = []
        for w, spec in kernel_specs(layer):
            centroids, assignment, keep = cluster_kernel(keras.ops.convert_to_numpy(w.value),
                                                         spec.output_axes, config)
            values = centroids.reshape(-1)[assignment] * keep
            values = np.where(values == 0, np.zeros_like(values), values)  # no -0.0
            w.assign(values.astype(w.dtype))
            distinct.append(len(np.unique(values)))
        ctx.applied(layer, _describe(config, distinct))

    @staticmethod
    def _wrap(layer, config: Cluster, importance=None) -> ClusterWrapper:
        results = [cluster_kernel(keras.ops.convert_to_numpy(w.value), spec.output_axes, config,
                                  (importance or {}).get(spec.name))
                   for w, spec in kernel_specs(layer)]
        wrapper = ClusterWrapper(layer, clusters=config.clusters,
                                 groups=tuple(len(r[0]) for r in results))
        wrapper.build(None)
        for kernel, (centroids, assignment, keep), c, a, k in zip(
                wrapper.kernels, results, wrapper.centroids, wrapper.assignment, wrapper.keep):
            c.assign(centroids)
            a.assign(assignment)
            k.assign(keep)
            kernel.trainable = False  # the centroids train instead
        return wrapper

    def finalize(self, model, config: Cluster, ctx: StepContext):
        for wrapper in [l for l in leaf_layers(model) if isinstance(l, ClusterWrapper)]:
            shared = wrapper.substitutes()
            distinct = []
            for kernel in wrapper.kernels:
                values = keras.ops.convert_to_numpy(shared[id(kernel)])
                values = np.where(values == 0, np.zeros_like(values), values)  # no -0.0
                kernel.assign(values)
                kernel.trainable = True
                distinct.append(len(np.unique(values)))
            how = ("codebooks chosen layer by layer on data (GPTQ sweep)"
                   if path_of(wrapper.layer) in ctx.state.solved else
                   "weighted by input energy" if path_of(wrapper.layer) in ctx.state.weighted
                   else None)
            ctx.applied(wrapper.layer, _describe(config.for_layer(wrapper.layer), distinct, how))
        unwrapped = replace_layers(model, lambda l: l.layer if isinstance(l, ClusterWrapper) else l)
        ctx.sort_results(unwrapped)
        return unwrapped


def _describe(config: Cluster, distinct: list, how: str | None = None) -> str:
    per = "layer" if config.granularity == "layer" else "output channel"
    return (f"{config.clusters} clusters per {per}; {max(distinct)} distinct values"
            + (", zeros kept" if config.preserve_sparsity else "")
            + (f", {how}" if how else ""))


def _share_by_reconstruction(model, layers: list, config: Cluster, ctx: StepContext) -> set:
    """Shares the weights of each of `layers` that reconstruction takes, in place and in graph
    order, on calibration data: the layer is solved toward the original model's output (see
    `kshrink.reconstruct`), its codebooks are k-means of that target weighted by input energy,
    the GPTQ sweep moves each weight to a centroid, spreading the error over the weights
    not yet shared, and the centroids are re-fitted by least squares to the weights that took
    them. Returns the names of the layers solved; the others are clustered as usual."""
    x = calibration_inputs(ctx.data, config.calibration_samples, "cluster: method gptq")
    targets = [(layer, layer) for layer in layers if unsupported(layer) is None]

    def solve(layer, name, weights, hessian):
        clusters = config.for_layer(layer).clusters
        g, rows, per_group = weights.shape
        matrix = ungrouped(weights)
        energy = energy_matrix(hessian, per_group)
        # zeros of the kernel as it is (the target fills them in), e.g. from pruning
        variable, spec = next((v, s) for v, s in kernel_specs(layer) if s.name == name)
        current = as_matrix(keras.ops.convert_to_numpy(variable.value), matrix_axes(layer, spec))
        keep = (current != 0) if config.preserve_sparsity else np.ones(matrix.shape, bool)
        codebooks = [matrix] if config.granularity == "layer" else [
            matrix[:, [c]] for c in range(matrix.shape[1])]
        centroids = np.zeros((len(codebooks), clusters))
        for i, values in enumerate(codebooks):
            live = keep if config.granularity == "layer" else keep[:, [i]]
            weight = energy if config.granularity == "layer" else energy[:, [i]]
            found = kmeans_1d(values[live], clusters, config.init,
                              weights=weight[live])[0] if live.any() else np.zeros(1)
            centroids[i, :len(found)] = found
            centroids[i, len(found):] = found[-1]  # fewer distinct values than clusters
        if config.granularity == "layer":
            centroids = np.repeat(centroids, matrix.shape[1], axis=0)
        # float32 centroids, so that the stored kernel holds exactly these values
        centroids = centroids.astype("float32").astype("float64").reshape(g, per_group, -1)
        keep = grouped(keep.astype("float64"), g)
        shared = gptq_codebook(weights, hessian, centroids, keep)
        return refit_centroids(weights, hessian, shared, centroids, keep,
                               pooled=config.granularity == "layer")[0]

    if targets:
        reconstruct(model, x, targets, solve, original=copy_model(model),
                    progress=within(ctx.progress, "cluster, GPTQ"))
    return {layer.name for _, layer in targets}


@dataclasses.dataclass(frozen=True)
class ClusterOverride(LayerOverride):
    """A different cluster count for some layers of a `Cluster` step (the first match wins).

    Args:
        layers: the layers this override applies to.
        clusters: their centroids per layer (or per output channel), from 2 to 4096.
    """

    name = "cluster override"

    clusters: int = option(16, "centroids per layer or channel (2-4096)", Int(low=2, high=4096))


@register_technique("cluster", handler=ClusterHandler(), stage=Stage.SHARING)
@dataclasses.dataclass(frozen=True)
class Cluster(Technique):
    """Weight sharing: replace each kernel's values by the nearest of a few k-means centroids.

    Args:
        clusters: centroids per layer (or per output channel), from 2 to 4096; 16 needs 4-bit
            indices, 256 needs 8.
        init: centroid initialization: `"linear"` (default; keeps the rare large weights),
            `"density"` or `"kmeans++"`.
        granularity: `"layer"` (one codebook per kernel) or `"channel"` (one per output
            channel: more accurate, a larger codebook).
        preserve_sparsity: zeros (e.g. from pruning) stay zero and take no cluster.
        weighted: weigh each weight's error in k-means by the energy of the input it
            multiplies on `calibration_samples` examples of `data` (the diagonal of the
            layer-wise Hessian), so centroids sit where the output is most sensitive;
            default: with data and per-channel codebooks (on a CNN trained on digits it cut
            the output error by 10-30% per channel and did not help per layer). Dense and
            convolutions; others unweighted.
        method: `"kmeans"` of each kernel's values, or `"gptq"`: layer by layer on
            `calibration_samples` examples of `data`, each layer solved toward the original
            model's output, its codebooks weighted k-means of that target, and each weight
            moved to a centroid by the GPTQ sweep, which spreads the error over the weights
            not yet shared, then the centroids re-fitted by least squares on the layer's
            inputs (Dense and convolutions; others by k-means). Default: gptq when
            data is given and no fine-tuning follows, else kmeans.
        calibration_samples: examples of `data` used to weigh and to solve.
        overrides: `ClusterOverride`s: other cluster counts for some layers (first match
            wins), e.g. 8 for a large Dense and 64 for a small first convolution.
        layers, exclude: selections of layers to consider / to leave alone.

    Example:

    ```python
    recipe = [kshrink.Prune(sparsity=0.9), kshrink.Cluster(clusters=16)]
    small, report = kshrink.compress(model, recipe, data=(x, y),
                                     fine_tune=kshrink.FineTune(epochs=2))
    ```
    """

    clusters: int = option(16, "centroids per layer or channel (2-4096)", Int(low=2, high=4096))
    init: str = option("linear", "linear, density or kmeans++", OneOf(INITS))
    granularity: str = option("layer", "layer or channel", OneOf(GRANULARITIES))
    preserve_sparsity: bool = option(True, "zeros stay zero and take no cluster", Flag())
    weighted: bool | None = option(
        None, "weigh by input energy on data (default: with data, channel granularity)",
        Flag(allow_none=True))
    method: str | None = option(None, "kmeans, or gptq: codebooks chosen layer by layer on "
                                      "data (default: gptq with data and no fine-tuning)",
                                OneOf(METHODS, allow_none=True))
    calibration_samples: int = calibration_option(256, "weighted and gptq: examples of data "
                                                       "used")
    overrides: tuple[ClusterOverride, ...] = option(
        (), "per-layer cluster counts; first match wins", Overrides(ClusterOverride))
    layers: Select | None = selection("layers to consider (default: all with kernels)")
    exclude: Select | None = selection("layers to leave unclustered")

    def for_layer(self, layer) -> Cluster:
        """This step as it clusters `layer`: with its override's cluster count, if any."""
        override = self.override_for(layer)
        return self if override is None else dataclasses.replace(
            self, clusters=override.clusters, overrides=())
