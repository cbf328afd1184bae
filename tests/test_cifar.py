"""cct.cifar: the official CIFAR-10/100 releases as archives and folders, lookup by name, download, safe pickles."""
import io
import os
import pickle
import urllib.error

import pytest
import torch

from data_fixtures import fake_cifar
from cct import cifar
from cct.data import load
from cct.sources import DataError


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "cache"


def test_cifar10_archive_and_folder(tmp_path, cache):
    archive = fake_cifar(tmp_path / "a", "cifar10")
    ds = load(archive, cache_dir=cache, progress=False)
    assert ds.classes == [f"class{i:02d}" for i in range(10)] and "CIFAR-10" in ds.source
    assert ds.train.images.shape == (20, 3, 32, 32) and ds.test.images.shape == (4, 3, 32, 32)
    raw = pickle.loads((tmp_path / "a" / "cifar-10-batches-py" / "data_batch_1").read_bytes(), encoding="bytes")
    assert torch.equal(ds.train.images[:4].reshape(4, -1), torch.from_numpy(raw[b"data"]))
    assert ds.train.labels[:4].tolist() == raw[b"labels"]
    folder = load(tmp_path / "a" / "cifar-10-batches-py", cache_dir=cache, progress=False)
    assert torch.equal(folder.train.images, ds.train.images)
    small = load(archive, cache_dir=cache, img_size=16, in_chans=1, progress=False)
    assert small.train.images.shape == (20, 1, 16, 16)


def test_cifar100_archive(tmp_path, cache):
    ds = load(fake_cifar(tmp_path, "cifar100", per_batch=6), cache_dir=cache, progress=False)
    assert len(ds.classes) == 100 and ds.train.images.shape == (6, 3, 32, 32) and len(ds.test) == 6
    raw = pickle.loads((tmp_path / "cifar-100-python" / "train").read_bytes(), encoding="bytes")
    assert ds.train.labels.tolist() == raw[b"fine_labels"]


def test_cifar_by_name(tmp_path, cache, monkeypatch):
    with pytest.raises(DataError, match="cifar-10-python.tar.gz") as e:
        load("cifar10", cache_dir=cache, download=False)
    assert str(cache) in str(e.value) and "\n" not in str(e.value)

    def offline(*a, **k):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(cifar.urllib.request, "urlopen", offline)
    with pytest.raises(DataError, match="put cifar-100-python.tar.gz"):
        load("cifar100", cache_dir=cache, progress=False)

    class FakeResponse(io.BytesIO):
        headers = {"Content-Length": "5"}
    monkeypatch.setattr(cifar.urllib.request, "urlopen", lambda *a, **k: FakeResponse(b"wrong"))
    with pytest.raises(DataError, match="md5"):
        load("cifar10", cache_dir=cache, progress=False)
    assert not list(cache.glob("*.tar.gz*"))  # no partial download left behind

    fake_cifar(cache, "cifar10")  # an archive in the cache directory is found by name
    monkeypatch.setenv("CCT_DATA", str(cache))
    assert load("cifar10", progress=False).train.images.shape == (20, 3, 32, 32)


def test_a_wrong_or_damaged_copy_in_the_data_folder(tmp_path, cache):
    """`--data cifar10` finds whatever sits under cifar10's archive name: another release is refused, not trained on
    as CIFAR-10; a truncated archive says it is the cached copy and what to do; a partial folder names what it lacks."""
    other = fake_cifar(tmp_path / "o", "cifar100")
    cache.mkdir()
    (cache / "cifar-10-python.tar.gz").write_bytes(other.read_bytes())
    with pytest.raises(DataError, match=r"--data cifar10 found this copy .* but it holds CIFAR-100; delete it") as e:
        load("cifar10", cache_dir=cache, download=False, progress=False)
    assert "\n" not in str(e.value)
    good = fake_cifar(tmp_path / "g", "cifar10").read_bytes()
    (cache / "cifar-10-python.tar.gz").write_bytes(good[:len(good) // 2])
    with pytest.raises(DataError, match=r"cannot read archive .*: the CIFAR-10 copy in the data folder is damaged; "
                                        r"delete it to download it again"):
        load("cifar10", cache_dir=cache, download=False, progress=False)
    (cache / "cifar-10-python.tar.gz").unlink()
    folder = fake_cifar(cache, "cifar10", archive=False)
    (folder / "test_batch").unlink()
    for source in ("cifar10", folder):
        with pytest.raises(DataError, match="test_batch missing, not an official CIFAR-10 copy"):
            load(source, cache_dir=cache, download=False, progress=False)


def test_crafted_pickle_refused(tmp_path, cache):
    folder = fake_cifar(tmp_path, "cifar10", archive=False)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": Evil()}))
    with pytest.raises(DataError, match="not allowed"):
        load(folder, cache_dir=cache, progress=False)


