"""kshrink's Keras layer classes, and the registry of facts about Keras layers.

A leaf package: it imports keras and numpy only. Importing it (`import kshrink` does) registers
every kshrink layer class with Keras, so `keras.saving.load_model` reads models that hold them.
Techniques, storage, measurement and export read layer facts from here (`spec_for`), and a
custom layer registers its own (`register_spec`).
"""

from kshrink.layers.quantized import (
    FLOAT_MODES,
    INTEGER_MODES,
    IntegerKernel,
    KERAS_INTEGER_LAYERS,
    MODES,
    QUANTIZED_CLASSES,
    QuantizedKernels,
    fake_quantize_kernel,
    integer_kernels,
    keras_base,
    keras_quantizes,
    quantization,
    quantize_layer,
    quantize_matrix,
)
from kshrink.layers.specs import (
    LayerSpec,
    WeightSpec,
    as_matrix,
    from_matrix,
    kernel_specs,
    kernel_weights,
    output_axes,
    register_spec,
    spec_for,
)
from kshrink.layers.wrappers import (
    ClusterWrapper,
    PruneWrapper,
    QuantizeAwareWrapper,
    SubstituteWrapper,
)

__all__ = ["FLOAT_MODES", "INTEGER_MODES", "KERAS_INTEGER_LAYERS", "MODES", "QUANTIZED_CLASSES",
           "ClusterWrapper", "IntegerKernel", "LayerSpec", "PruneWrapper",
           "QuantizeAwareWrapper", "QuantizedKernels", "SubstituteWrapper", "WeightSpec",
           "as_matrix", "fake_quantize_kernel", "from_matrix", "integer_kernels", "keras_base",
           "keras_quantizes", "kernel_specs", "kernel_weights", "output_axes", "quantization",
           "quantize_layer", "quantize_matrix", "register_spec", "spec_for"]
