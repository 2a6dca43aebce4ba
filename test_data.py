"""The data loaders: MNIST through torchvision (plain or .gz IDX files, offline), CIFAR-10, and their errors."""
import gzip
import os

import numpy as np
import pytest
import torch

from conftest import make_mnist, write_idx
from realnvp import DataNotFoundError, ImageDataset


def read_idx(path):
    """An IDX file of unsigned bytes (or its .gz) as a numpy array, read directly: magic, sizes, data."""
    with (gzip.open if path.endswith('.gz') else open)(path, 'rb') as f:
        data = f.read()
    dims = np.frombuffer(data, dtype='>i4', count=data[3], offset=4)
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * data[3]).reshape(dims).copy()



@pytest.mark.parametrize('gz', [False, True])
def test_mnist_loader_filters_resizes_and_keeps_the_pixel_grid(tmp_path, gz):
    root = make_mnist(str(tmp_path), n=30, gz=gz)
    ds = ImageDataset('mnist', root, train=True, img_size=14, digits=[0, 2], download=False)
    assert len(ds) == 6
    assert set(ds.labels.tolist()) == {0, 2}
    assert ds.images.shape == (6, 1, 14, 14) and ds.images.dtype == torch.uint8
    x, label = ds[0]
    assert x.shape == (1, 14, 14) and label in (0, 2)
    assert x.min() >= 0 and x.max() <= 1
    assert torch.allclose(x * 255, (x * 255).round(), atol=1e-4)
    # a resize is a local average: the mean brightness survives it
    name = 'train-images-idx3-ubyte' + ('.gz' if gz else '')
    src = torch.from_numpy(read_idx(os.path.join(root, 'MNIST', 'raw', name)))
    assert abs(ds.images.float().mean() - src[ds.labels.new_tensor([0, 2, 10, 12, 20, 22])].float().mean()) < 3
    test = ImageDataset('mnist', root, train=False, img_size=28, download=False)
    assert len(test) == 30 and test.images.shape == (30, 1, 28, 28)
    assert torch.equal(test.images[:, 0], torch.from_numpy(read_idx(os.path.join(
        root, 'MNIST', 'raw', 't10k-images-idx3-ubyte' + ('.gz' if gz else '')))))


def test_missing_mnist_offline_names_the_files_and_the_flag(tmp_path, monkeypatch):
    import torchvision

    def offline(root, *args, **kwargs):
        os.makedirs(os.path.join(root, 'MNIST', 'raw'), exist_ok=True)   # as torchvision does before it downloads
        raise RuntimeError('Error downloading train-images-idx3-ubyte.gz:\n'
                           '<urlopen error [Errno -2] Name or service not known>')

    monkeypatch.setattr(torchvision.datasets, 'MNIST', offline)
    with pytest.raises(DataNotFoundError) as info:
        ImageDataset('mnist', str(tmp_path), train=True)
    message = str(info.value)
    assert '\n' not in message
    for needed in ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte', '--data-dir', str(tmp_path)):
        assert needed in message
    assert 'Name or service not known' in message
    assert os.listdir(tmp_path) == []   # the failed download left no empty MNIST/raw/ behind


def test_missing_cifar10_names_the_folder_and_the_flag(tmp_path, monkeypatch):
    import torchvision
    with pytest.raises(DataNotFoundError, match='CIFAR-10 not found in .*cifar-10-batches-py.*--data-dir'):
        ImageDataset('cifar10', str(tmp_path), img_size=32, download=False)
    real = torchvision.datasets.CIFAR10

    def offline(root, train=True, download=False):
        if download:
            raise RuntimeError('<urlopen error [Errno -2] Name or service not known>')
        return real(root, train=train, download=False)

    monkeypatch.setattr(torchvision.datasets, 'CIFAR10', offline)
    with pytest.raises(DataNotFoundError, match='downloading failed: .*Name or service not known'):
        ImageDataset('cifar10', str(tmp_path), img_size=32)


@pytest.mark.parametrize('gz', [False, True])
def test_corrupt_idx_files_are_one_line_errors(tmp_path, gz):
    root = make_mnist(str(tmp_path), n=4, gz=gz)
    path = os.path.join(root, 'MNIST', 'raw', 'train-images-idx3-ubyte' + ('.gz' if gz else ''))
    with open(path, 'r+b') as f:
        f.truncate(100 if not gz else 40)
    with pytest.raises(ValueError, match='cannot be read') as info:
        ImageDataset('mnist', root, train=True, download=False)
    assert '\n' not in str(info.value) and ('.gz' in str(info.value)) == gz
    with pytest.raises(ValueError, match='unknown data set'):
        ImageDataset('svhn', root)




def test_a_split_of_zero_images_is_a_one_line_error(tmp_path):
    root = make_mnist(str(tmp_path), n=20)
    write_idx(os.path.join(root, 'MNIST', 'raw', 't10k-images-idx3-ubyte'), np.zeros((0, 28, 28)))
    write_idx(os.path.join(root, 'MNIST', 'raw', 't10k-labels-idx1-ubyte'), np.zeros((0,)))
    with pytest.raises(ValueError, match='MNIST files in .* cannot be read'):
        ImageDataset('mnist', root, train=False, img_size=14, download=False)
