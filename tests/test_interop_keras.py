"""cct.interop.keras: the keras.io CCT example's weights load into `cct_2_3x2_32_keras` and agree.

The fixture pair comes from tests/fixtures/make_keras_fixture.py (run in a separate Keras venv);
these tests need only h5py and torch.
"""
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import cct

from cct import from_keras
from cct.interop.keras import KerasWeightsError, keras_state_dict, layer_order_key, sort_layer_names

FIXTURES = Path(__file__).parent / "fixtures"
WEIGHTS = FIXTURES / "keras_cct.weights.h5"
EXPECTED = FIXTURES / "keras_cct_expected.h5"


def expected():
    with h5py.File(EXPECTED, "r") as f:
        return f["images"][()], f["logits"][()], f["pre_logits"][()]


def to_model_input(images: np.ndarray) -> torch.Tensor:
    # NHWC uint8 → NCHW float in [0, 1]: our model has no Rescaling layer
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255


def keras_logits_diff(model: torch.nn.Module) -> float:
    images, logits, _ = expected()
    with torch.no_grad():
        out = model.eval().float()(to_model_input(images))
    return (out - torch.from_numpy(logits)).abs().max().item()


def test_logits_match_keras():
    model = from_keras(WEIGHTS)
    assert not model.training
    assert keras_logits_diff(model) <= 1e-5


def test_pooled_features_match_keras():
    images, _, pre_logits = expected()
    model = from_keras(WEIGHTS)
    with torch.no_grad():
        features = model.forward_head(model.forward_features(to_model_input(images)), pre_logits=True)
    assert (features - torch.from_numpy(pre_logits)).abs().max().item() <= 1e-5


def test_from_keras_builds_the_registered_variant():
    model = from_keras(WEIGHTS)
    assert model.cfg == cct.create_model("cct_2_3x2_32_keras").cfg


def test_filter_covers_every_parameter_with_matching_shapes():
    state = keras_state_dict(WEIGHTS)
    reference = cct.create_model("cct_2_3x2_32_keras").state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == {k: tuple(v.shape) for k, v in reference.items()}
    assert all(v.dtype == torch.float32 and v.is_contiguous() for v in state.values())


def test_create_model_pretrained_reads_keras_weights():
    model = cct.create_model("cct_2_3x2_32_keras", pretrained=str(WEIGHTS))
    assert keras_logits_diff(model) <= 1e-5


def test_layer_order_is_numeric_not_lexicographic():
    assert layer_order_key("dense") == ("dense", 0)
    assert layer_order_key("dense_10") == ("dense", 10)
    assert layer_order_key("conv2d") == ("conv2d", 0)
    assert layer_order_key("layer_normalization_3") == ("layer_normalization", 3)
    names = ["dense_10", "dense_2", "dense", "dense_9", "dense_1"]
    assert sorted(names) == ["dense", "dense_1", "dense_10", "dense_2", "dense_9"]  # what must not happen
    assert sort_layer_names(names) == ["dense", "dense_1", "dense_2", "dense_9", "dense_10"]


# ---------------------------------------------------------------------- legacy (tf.keras 2) layout
OFFSETS = {"conv2d": 9, "dense": 9, "layer_normalization": 8, "multi_head_attention": 9}
ATTENTION = {"query_dense": "query", "key_dense": "key", "value_dense": "value", "output_dense": "attention_output"}


def _offset_name(name: str) -> str:
    kind, index = layer_order_key(name)
    return f"{kind}_{index + OFFSETS[kind]}" if kind in OFFSETS else name


def write_legacy_copy(src: Path, dst: Path, *, example_2021: bool = False) -> None:
    """Rewrite the Keras 3 fixture in tf.keras 2's legacy HDF5 layout: groups named after each
    layer's own name, with offset numbers crossing 10 (dense_9 ... dense_14), `:0` weight names.

    `example_2021` mimics the example's first (tf.keras) version: an `Embedding` layer for the
    positions and the token-scoring Dense(1) as a plain top-level layer before the classifier.
    """
    layers = {}  # legacy layer name -> {weight name: array}, in model order

    def add(layer: str, weight: str, value: np.ndarray) -> None:
        layers.setdefault(layer, {})[f"{weight}:0"] = value

    with h5py.File(src, "r") as f:
        root = f["layers"]
        convs = root["cct_tokenizer/conv_model/layers"]
        for conv in sort_layer_names(n for n in convs if n.startswith("conv2d")):
            add("cct_tokenizer", f"cct_tokenizer/sequential/{_offset_name(conv)}/kernel", convs[conv]["vars/0"][()])
        position = "embedding" if example_2021 else "position_embedding"
        add(position, f"{position}/embeddings", root["position_embedding/vars/0"][()])
        dense_names = sort_layer_names(n for n in root if n.startswith("dense"))
        for name in sort_layer_names(root):
            kind, group = layer_order_key(name)[0], root[name]
            legacy = _offset_name(name)
            if kind == "layer_normalization":
                add(legacy, f"{legacy}/gamma", group["vars/0"][()])
                add(legacy, f"{legacy}/beta", group["vars/1"][()])
            elif kind == "multi_head_attention":
                for part, legacy_part in ATTENTION.items():
                    add(legacy, f"{legacy}/{legacy_part}/kernel", group[part]["vars/0"][()])
                    add(legacy, f"{legacy}/{legacy_part}/bias", group[part]["vars/1"][()])
            elif kind == "dense" and name != dense_names[-1]:
                add(legacy, f"{legacy}/kernel", group["vars/0"][()])
                add(legacy, f"{legacy}/bias", group["vars/1"][()])
        # the pooling scorer was the 13th Dense built, the classifier the 14th
        pool = root["sequence_pooling/attention"]
        scorer = "dense_13" if example_2021 else "sequence_pooling"
        add(scorer, f"{'' if example_2021 else 'sequence_pooling/'}dense_13/kernel", pool["vars/0"][()])
        add(scorer, f"{'' if example_2021 else 'sequence_pooling/'}dense_13/bias", pool["vars/1"][()])
        head = root[dense_names[-1]]
        add("dense_14", "dense_14/kernel", head["vars/0"][()])
        add("dense_14", "dense_14/bias", head["vars/1"][()])

    with h5py.File(dst, "w") as out:
        out.attrs["layer_names"] = [n.encode() for n in layers]
        for layer, weights in layers.items():
            group = out.create_group(layer)
            group.attrs["weight_names"] = [w.encode() for w in weights]
            for weight, value in weights.items():
                group.create_dataset(weight, data=value)


@pytest.mark.parametrize("example_2021", [False, True])
def test_legacy_layout_with_name_offsets(tmp_path, example_2021):
    legacy = tmp_path / "legacy.h5"
    write_legacy_copy(WEIGHTS, legacy, example_2021=example_2021)
    with h5py.File(legacy, "r") as f:
        assert sorted(f)[:2] == ["cct_tokenizer", "dense_10"]  # string order would misplace dense_9
    state, reference = keras_state_dict(legacy), keras_state_dict(WEIGHTS)
    assert state.keys() == reference.keys()
    for key in reference:
        assert torch.equal(state[key], reference[key]), key
    assert keras_logits_diff(from_keras(legacy)) <= 1e-5


# ---------------------------------------------------------------------- errors
def test_missing_file(tmp_path):
    missing = tmp_path / "nope.weights.h5"
    with pytest.raises(KerasWeightsError, match="nope.weights.h5: no such file"):
        from_keras(missing)
    assert issubclass(KerasWeightsError, ValueError)


def test_not_an_hdf5_file(tmp_path):
    bogus = tmp_path / "bogus.weights.h5"
    bogus.write_text("this is not HDF5\n")
    with pytest.raises(KerasWeightsError, match="bogus.weights.h5: not a readable HDF5 file") as info:
        keras_state_dict(bogus)
    assert "\n" not in str(info.value)


def test_hdf5_without_keras_layout(tmp_path):
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f.create_dataset("x", data=np.zeros(3))
    with pytest.raises(KerasWeightsError, match="other.h5: not the keras.io CCT example's weights"):
        keras_state_dict(other)


def test_wrong_shapes(tmp_path):
    broken = tmp_path / "broken.weights.h5"
    broken.write_bytes(WEIGHTS.read_bytes())
    with h5py.File(broken, "r+") as f:
        del f["layers/multi_head_attention/query_dense/vars/0"]
        f["layers/multi_head_attention/query_dense/vars/0"] = np.zeros((128, 256), np.float32)
    with pytest.raises(KerasWeightsError, match=r"broken.weights.h5: .*query kernel has shape \(128, 256\)") as info:
        from_keras(broken)
    assert "\n" not in str(info.value)


def test_weights_that_do_not_fit_the_model(tmp_path):
    broken = tmp_path / "narrow.weights.h5"
    broken.write_bytes(WEIGHTS.read_bytes())
    with h5py.File(broken, "r+") as f:  # a classifier whose input width disagrees with the stream
        del f["layers/dense_4/vars/0"]
        f["layers/dense_4/vars/0"] = np.zeros((64, 10), np.float32)
    with pytest.raises(KerasWeightsError, match="narrow.weights.h5: weights do not fit cct_2_3x2_32_keras"):
        from_keras(broken)
