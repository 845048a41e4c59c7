"""MACs per example, against hand counts."""

import keras

import kshrink

layers = keras.layers


def test_macs_match_hand_counts():
    inputs = keras.Input((16, 16, 3))
    x = layers.Conv2D(8, 3, padding="same", name="conv")(inputs)            # 16*16*8*27
    x = layers.DepthwiseConv2D(3, strides=2, padding="same", name="dw")(x)  # 8*8*8*9
    x = layers.SeparableConv2D(4, 3, padding="same", name="sep")(x)         # 8*8*8*(9+4)
    x = layers.Conv2D(8, 1, groups=2, name="grouped")(x)                    # 8*8*8*2
    x = layers.Conv2DTranspose(2, 2, strides=2, name="up")(x)               # 8*8*8*2*4
    x = layers.GlobalAveragePooling2D()(x)
    outputs = layers.Dense(10, name="fc")(x)                                # 2*10
    counted = kshrink.measure.macs(keras.Model(inputs, outputs))
    expected = {"conv": 16 * 16 * 8 * 27, "dw": 8 * 8 * 8 * 9, "sep": 8 * 8 * 8 * 13,
                "grouped": 8 * 8 * 8 * 2, "up": 8 * 8 * 8 * 2 * 4, "fc": 20}
    assert {name: count for name, (_, count) in counted.layers.items()} == expected
    assert counted.total == sum(expected.values())


def test_quantized_layers_count_like_their_float_form(cnn):
    small, _ = kshrink.compress(cnn, kshrink.Quantize(mode="int4", fold_batchnorm=False))
    count = lambda model: {n: c for n, (_, c) in kshrink.measure.macs(model).layers.items()}  # noqa
    assert count(small) == count(cnn) and count(cnn)["conv2"] == 8 * 8 * 8 * 9 * 8
