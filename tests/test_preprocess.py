"""cct.preprocess: one record of how inputs are prepared and evaluated, in checkpoints and ONNX metadata."""
from pathlib import Path

import pytest
import torch

import cct
from cct.cifar import CIFAR_MEAN, CIFAR_STD
from cct.checkpoint import read_checkpoint
from cct.evaluate import load_for_eval, predict_logits
from cct.predict import open_classifier
from cct.preprocess import Preprocessing

FIXTURES = Path(__file__).parent / "fixtures"


def test_round_trip_and_normalisation():
    prep = Preprocessing([16, 24], 3, [0.5, 0.4, 0.3], [0.2, 0.25, 0.3], precision="bf16", batch_size=7, tta=True)
    assert prep.img_size == (16, 24) and prep.mean == (0.5, 0.4, 0.3)
    assert Preprocessing.from_dict(prep.to_dict()) == prep
    shifted = Preprocessing([16, 24], 3, tta=True, tta_translate=1)
    assert Preprocessing.from_dict(shifted.to_dict()).tta_translate == 1
    assert Preprocessing.from_checkpoint({"eval": prep.to_dict(), "config": {}}) == prep
    images = torch.randint(0, 256, (2, 3, 16, 24), dtype=torch.uint8)
    expected = (images.float() / 255 - torch.tensor(prep.mean)[:, None, None]) / torch.tensor(prep.std)[:, None, None]
    torch.testing.assert_close(prep(images), expected)
    plain = Preprocessing((16, 24), 3)
    assert torch.equal(plain(images), images.float() / 255)


def test_defaults_for_checkpoints_not_trained_here():
    official = {"config": {"block": "official", "in_chans": 3, "img_size": [32, 32]}}
    keras = {"config": {"block": "keras", "in_chans": 3, "img_size": [32, 32]}}
    gray = {"config": {"block": "official", "in_chans": 1, "img_size": [28, 28]}}
    assert Preprocessing.from_checkpoint(official).mean == tuple(CIFAR_MEAN)
    assert Preprocessing.from_checkpoint(official).std == tuple(CIFAR_STD)
    assert Preprocessing.from_checkpoint(keras).mean is None
    assert Preprocessing.from_checkpoint(gray) == Preprocessing((28, 28), 1)
    assert Preprocessing.from_checkpoint({**official, "eval": {"mean": None, "std": None}}).mean is None


def test_checkpoints_written_before_the_refactor_load_and_predict_the_same():
    """tests/fixtures/before_kernels.pt was written by cct at a8fcc82 (tests/fixtures/make_before_kernels_fixture.py),
    with the short "eval" entry of that time; its logits are those that version computed."""
    expected = torch.load(FIXTURES / "before_kernels_expected.pt", weights_only=True)
    model, prep = load_for_eval(FIXTURES / "before_kernels.pt")
    assert prep == Preprocessing((16, 16), 3, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), precision="fp32", batch_size=4,
                                 tta=True)
    assert model.class_names == ["ant", "bee", "cat"]
    torch.testing.assert_close(predict_logits(model, expected["images"], prep), expected["logits"], atol=1e-5, rtol=1e-5)
    for kernels in ("fast", "reference"):
        clf = open_classifier(FIXTURES / "before_kernels.pt", kernels=kernels)
        assert clf.preprocessing == prep
        x = clf.preprocessing(expected["images"])
        torch.testing.assert_close((clf.logits(x) + clf.logits(x.flip(-1))) / 2, expected["logits"], atol=1e-5, rtol=1e-5)
    assert read_checkpoint(FIXTURES / "before_kernels.pt")["eval"]["batch_size"] == 4


def test_a_checkpoint_stores_the_record(tmp_path):
    model = cct.create_model("cct_2_3x2_32", num_classes=3, img_size=16)
    prep = Preprocessing((16, 16), 3, (0.1, 0.2, 0.3), (0.3, 0.2, 0.1), batch_size=9)
    for name in ("m.pt", "m.safetensors"):
        cct.save_checkpoint(model, tmp_path / name, eval=prep.to_dict())
        assert load_for_eval(tmp_path / name)[1] == prep


@pytest.mark.parametrize("classes, mean", [(1000, 0.485), (102, 0.4353), (100, 0.5071), (10, 0.4914), (7, 0.4914)])
def test_official_weights_normalise_as_the_recipe_of_their_dataset(tmp_path, classes, mean):
    """An official .pth records no normalisation: its head's class count names the dataset, and so its statistics."""
    torch.save({"classifier.fc.weight": torch.zeros(classes, 8), "tokenizer.conv_layers.0.0.weight":
                torch.zeros(8, 3, 3, 3)}, tmp_path / "official.pth")
    assert Preprocessing.of_weights(tmp_path / "official.pth", in_chans=3).mean[0] == pytest.approx(mean)
    assert Preprocessing.of_weights(tmp_path / "official.pth", in_chans=3, keras=True).mean is None  # x / 255


def test_a_compiled_models_state_dict_names_its_dataset_too(tmp_path):
    torch.save({"_orig_mod.module.head.weight": torch.zeros(1000, 8)}, tmp_path / "compiled.pt")
    assert Preprocessing.of_weights(tmp_path / "compiled.pt", in_chans=3).mean[0] == pytest.approx(0.485)
