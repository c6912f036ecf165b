"""Fine-grained readers on miniature copies of each official layout (tiny generated images, the real file formats),
the shipped Fashion-MNIST subset, and the ImageFolder converter."""
import collections
import os
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from carrot_zzz.data import create_dataset
from carrot_zzz.data import fashion_mnist, make_fashion_mnist_subset
from carrot_zzz.data.to_imagefolder import class_folders, main as to_imagefolder_main


def _img(path, value=0, size=(6, 5)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new('RGB', size, (value, 2 * value % 256, 3 * value % 256)).save(path, quality=95)


def _write(path, lines):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
        f.write(''.join(line + '\n' for line in lines))


def _check(ds, n, classes, labels=None):
    assert len(ds) == n and list(ds.classes) == list(classes)
    if labels is not None:
        assert ds.targets == labels
    img, target = ds[0]
    assert isinstance(img, Image.Image) and img.mode == 'RGB' and target == ds.targets[0]


# --- CUB-200-2011 and NABirds (same four text files) -----------------------------------------------------------

@pytest.fixture
def cub(tmp_path):
    root = tmp_path / 'CUB_200_2011'
    classes = ['001.Black_footed_Albatross', '002.Laysan_Albatross', '003.Sooty_Albatross']
    images, labels, split = [], [], []
    for i in range(1, 10):                                   # ids 1..9, class (i-1)//3 + 1, every third is test
        c = classes[(i - 1) // 3]
        rel = f'{c}/{c[4:]}_{i:04d}.jpg'
        _img(str(root / 'images' / rel), i)
        images.append(f'{i} {rel}')
        labels.append(f'{i} {(i - 1) // 3 + 1}')
        split.append(f'{i} {0 if i % 3 == 0 else 1}')
    _write(str(root / 'images.txt'), images)
    _write(str(root / 'image_class_labels.txt'), labels)
    _write(str(root / 'train_test_split.txt'), split)
    _write(str(root / 'classes.txt'), [f'{k + 1} {c}' for k, c in enumerate(classes)])
    return root, classes


def test_cub200(cub):
    root, classes = cub
    train = create_dataset('cub200', root=str(root), split='train')
    _check(train, 6, classes, [0, 0, 1, 1, 2, 2])
    assert os.path.basename(train.samples[0][0]) == 'Black_footed_Albatross_0001.jpg'
    for split in ('validation', 'val', 'test'):
        _check(create_dataset('cub200', root=str(root), split=split), 3, classes, [0, 1, 2])
    # the folder holding CUB_200_2011 works too (as extracted from the archive)
    assert len(create_dataset('CUB200', root=str(root.parent), split='train')) == 6


def test_nabirds(tmp_path):
    root = tmp_path / 'nabirds'
    # classes.txt lists the whole hierarchy; images use leaf ids 295, 5, 1010 (not contiguous, not sorted)
    _write(str(root / 'classes.txt'), ['0 Birds', '5 Bewick\'s Wren', '22 Perching Birds', '295 Common Loon',
                                       '1010 Snow Goose (Blue morph)'])
    ids = ['0d0e-aa', '1f2b-bb', '2c3d-cc', '3d4e-dd', '4e5f-ee']
    leaf = ['295', '5', '1010', '5', '295']
    rel = [f'{int(c):04d}/{i}.jpg' for i, c in zip(ids, leaf)]
    for r in rel:
        _img(str(root / 'images' / r), 7)
    _write(str(root / 'images.txt'), [f'{i} {r}' for i, r in zip(ids, rel)])
    _write(str(root / 'image_class_labels.txt'), [f'{i} {c}' for i, c in zip(ids, leaf)])
    _write(str(root / 'train_test_split.txt'), [f'{i} {s}' for i, s in zip(ids, '11001')])
    classes = ["Bewick's Wren", 'Common Loon', 'Snow Goose (Blue morph)']      # ids 5 < 295 < 1010
    _check(create_dataset('nabirds', root=str(root), split='train'), 3, classes, [1, 0, 1])
    _check(create_dataset('nabirds', root=str(root), split='validation'), 2, classes, [2, 0])


# --- FGVC-Aircraft -----------------------------------------------------------------------------------------------

@pytest.fixture
def aircraft(tmp_path):
    data = tmp_path / 'fgvc-aircraft-2013b' / 'data'
    variants = ['707-320', 'Cessna 172', 'F/A-18']
    families = ['Boeing 707', 'Cessna 172', 'F/A-18']
    manufacturers = ['Boeing', 'Cessna', 'McDonnell Douglas']
    _write(str(data / 'variants.txt'), variants)
    _write(str(data / 'families.txt'), families)
    _write(str(data / 'manufacturers.txt'), manufacturers)
    parts = {'train': [('1025794', 0), ('1340192', 1)], 'val': [('0056978', 2)],
             'test': [('1514522', 2), ('0062765', 0), ('1156370', 1)]}
    for part, items in parts.items():
        for i, k in items:
            _img(str(data / 'images' / f'{i}.jpg'), k, size=(8, 28))
        for level, names in (('variant', variants), ('family', families), ('manufacturer', manufacturers)):
            _write(str(data / f'images_{level}_{part}.txt'), [f'{i} {names[k]}' for i, k in items])
            if part == 'test':
                trainval = parts['train'] + parts['val']
                _write(str(data / f'images_{level}_trainval.txt'), [f'{i} {names[k]}' for i, k in trainval])
    return tmp_path / 'fgvc-aircraft-2013b', variants, families, manufacturers


def test_fgvc_aircraft(aircraft):
    root, variants, families, manufacturers = aircraft
    _check(create_dataset('fgvc_aircraft', root=str(root), split='train'), 3, variants, [0, 1, 2])   # trainval
    _check(create_dataset('fgvc_aircraft', root=str(root / 'data'), split='validation'), 3, variants, [2, 0, 1])
    _check(create_dataset('fgvc_aircraft', root=str(root), split='train_only'), 2, variants, [0, 1])
    _check(create_dataset('fgvc_aircraft', root=str(root), split='val_only'), 1, variants, [2])
    _check(create_dataset('fgvc_aircraft_family', root=str(root), split='test'), 3, families, [2, 0, 1])
    _check(create_dataset('aircraft_manufacturer', root=str(root), split='trainval'), 3, manufacturers, [0, 1, 2])
    ds = create_dataset('fgvc_aircraft', root=str(root), split='test')
    assert os.path.basename(ds.samples[0][0]) == '1514522.jpg' and ds[0][0].size == (8, 28)


# --- .mat layouts (scipy) ---------------------------------------------------------------------------------------

def _savemat(path, d):
    sio = pytest.importorskip('scipy.io')
    os.makedirs(os.path.dirname(path), exist_ok=True)
    sio.savemat(path, d)


def _struct(rows, fields):
    arr = np.zeros((1, len(rows)), dtype=[(f, 'O') for f in fields])
    for k, row in enumerate(rows):
        for f, v in zip(fields, row):
            arr[0, k][f] = v
    return arr


def _cell(strings):
    out = np.empty((len(strings), 1), dtype=object)
    for k, s in enumerate(strings):
        out[k, 0] = s
    return out


def test_stanford_cars(tmp_path):
    pytest.importorskip('scipy.io')
    root = tmp_path / 'stanford_cars'
    classes = ['AM General Hummer SUV 2000', 'Acura RL Sedan 2012', 'Volvo XC90 SUV 2007']
    fields = ('bbox_x1', 'bbox_y1', 'bbox_x2', 'bbox_y2', 'class', 'fname')
    train = [(1, 1, 5, 4, 3, '00001.jpg'), (1, 1, 5, 4, 1, '00002.jpg'), (1, 1, 5, 4, 2, '00003.jpg')]
    test = [(1, 1, 5, 4, 2, '00001.jpg'), (1, 1, 5, 4, 3, '00002.jpg')]
    for folder, rows in (('cars_train', train), ('cars_test', test)):
        for r in rows:
            _img(str(root / folder / r[-1]), r[4])
    _savemat(str(root / 'devkit' / 'cars_meta.mat'), {'class_names': _cell(classes).T})
    _savemat(str(root / 'devkit' / 'cars_train_annos.mat'), {'annotations': _struct(train, fields)})
    _savemat(str(root / 'cars_test_annos_withlabels.mat'), {'annotations': _struct(test, fields)})
    _check(create_dataset('stanford_cars', root=str(root), split='train'), 3, classes, [2, 0, 1])
    ds = create_dataset('cars', root=str(root), split='validation')
    _check(ds, 2, classes, [1, 2])
    assert ds.samples[1][0].endswith(os.path.join('cars_test', '00002.jpg'))


def test_stanford_dogs(tmp_path):
    pytest.importorskip('scipy.io')
    root = tmp_path / 'dogs'
    folders = ['n02085620-Chihuahua', 'n02085782-Japanese_spaniel', 'n02116738-African_hunting_dog']
    train = [(f'{folders[0]}/n02085620_1.jpg', 1), (f'{folders[2]}/n02116738_2.jpg', 3)]
    test = [(f'{folders[1]}/n02085782_3.jpg', 2), (f'{folders[0]}/n02085620_4.jpg', 1)]
    for f, y in train + test:
        _img(str(root / 'Images' / f), y)
    for name, rows in (('train_list.mat', train), ('test_list.mat', test)):
        _savemat(str(root / name), {'file_list': _cell([f for f, _ in rows]),
                                    'annotation_list': _cell([f[:-4] for f, _ in rows]),
                                    'labels': np.array([[y] for _, y in rows], dtype=np.float64)})
    classes = ['Chihuahua', 'Japanese_spaniel', 'African_hunting_dog']
    _check(create_dataset('stanford_dogs', root=str(root), split='train'), 2, classes, [0, 2])
    _check(create_dataset('dogs', root=str(root), split='test'), 2, classes, [1, 0])


def test_flowers102(tmp_path):
    pytest.importorskip('scipy.io')
    root = tmp_path / 'flowers'
    labels = [77, 1, 102, 1, 77, 2, 102]                        # image_00001 .. image_00007, 1-based classes
    for k, y in enumerate(labels, 1):
        _img(str(root / 'jpg' / f'image_{k:05d}.jpg'), y)
    _savemat(str(root / 'imagelabels.mat'), {'labels': np.array([labels], dtype=np.uint8)})
    _savemat(str(root / 'setid.mat'), {'trnid': np.array([[4, 1]]), 'valid': np.array([[6]]),
                                       'tstid': np.array([[2, 3, 5, 7]])})
    train = create_dataset('flowers102', root=str(root), split='train')          # trnid + valid, sorted
    assert len(train.classes) == 102
    _check(train, 3, train.classes, [76, 0, 1])
    assert [os.path.basename(p) for p, _ in train.samples] == ['image_00001.jpg', 'image_00004.jpg', 'image_00006.jpg']
    _check(create_dataset('flowers102', root=str(root), split='validation'), 4, train.classes, [0, 101, 76, 101])
    _check(create_dataset('flowers102', root=str(root), split='val_only'), 1, train.classes, [1])
    assert train.classes[0] in ('pink primrose', 'flower_001')


def test_mat_without_scipy_names_the_extra(tmp_path, monkeypatch):
    root = tmp_path / 'flowers'
    (root / 'jpg').mkdir(parents=True)
    for f in ('imagelabels.mat', 'setid.mat'):
        (root / f).write_bytes(b'')
    monkeypatch.setitem(sys.modules, 'scipy', None)
    monkeypatch.setitem(sys.modules, 'scipy.io', None)
    with pytest.raises(ImportError, match=r"carrot-zzz\[mat\]"):
        create_dataset('flowers102', root=str(root), split='train')


# --- errors --------------------------------------------------------------------------------------------------------

def test_clear_errors(tmp_path, cub):
    with pytest.raises(FileNotFoundError, match='pass --data-dir'):
        create_dataset('cub200', root=None, split='train')
    with pytest.raises(FileNotFoundError, match='does not exist'):
        create_dataset('cub200', root=str(tmp_path / 'nope'), split='train')
    (tmp_path / 'empty').mkdir()
    with pytest.raises(FileNotFoundError, match='images.txt'):
        create_dataset('cub200', root=str(tmp_path / 'empty'), split='train')
    with pytest.raises(ValueError, match="unknown split 'holdout'"):
        create_dataset('cub200', root=str(cub[0]), split='holdout')
    with pytest.raises(ValueError, match='remove --class-map'):
        create_dataset('cub200', root=str(cub[0]), split='train', class_map='map.txt')


def test_list_files_that_disagree(cub, aircraft):
    """An image id missing from image_class_labels.txt, a variant missing from variants.txt: one ValueError."""
    root = cub[0]
    labels = (root / 'image_class_labels.txt').read_text().splitlines()
    _write(str(root / 'image_class_labels.txt'), labels[:-1])
    with pytest.raises(ValueError, match="cub200: the list files in .* do not agree: '9' .*extract the original"):
        create_dataset('cub200', root=str(root), split='train')
    data = aircraft[0] / 'data'
    _write(str(data / 'variants.txt'), aircraft[1][:2])
    with pytest.raises(ValueError, match="fgvc_aircraft .variant.: the list files .* do not agree: 'F/A-18'"):
        create_dataset('fgvc_aircraft', root=str(aircraft[0]), split='train')


def test_other_names_go_to_timm(tmp_path):
    for c in ('a', 'b'):
        _img(str(tmp_path / 'val' / c / 'x.png'), 3)
    ds = create_dataset('', root=str(tmp_path), split='validation')
    assert len(ds) == 2 and ds.reader.class_to_idx == {'a': 0, 'b': 1}


# --- Fashion-MNIST ---------------------------------------------------------------------------------------------------

def test_shipped_fashion_mnist_subset():
    train = create_dataset('fashion_mnist', root=None, split='train')
    test = create_dataset('fashion_mnist', root='', split='validation')
    assert len(train) == 3000 and len(test) == 1000
    assert collections.Counter(train.targets) == {c: 300 for c in range(10)}
    assert collections.Counter(test.targets) == {c: 100 for c in range(10)}
    assert train.classes[0] == 'T-shirt/top' and train.classes[9] == 'Ankle boot'
    img, y = train[0]
    assert img.size == (28, 28) and img.mode == 'RGB' and y == train.targets[0]
    assert create_dataset('fashion_mnist', None, 'test', input_img_mode='L')[0][0].mode == 'L'
    folder = fashion_mnist.SHIPPED_DIR
    assert sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)) <= 2 * 1024 * 1024
    assert {'LICENSE', 'README.md'} <= set(os.listdir(folder))


def test_fashion_mnist_full_files_reader(tmp_path):
    """The same reader takes the original files (gzipped or not) when --data-dir points at them."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7, 28, 28), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5, 9, 2], dtype=np.uint8)
    fashion_mnist.write_idx(str(tmp_path / 'train-images-idx3-ubyte.gz'), images)
    fashion_mnist.write_idx(str(tmp_path / 'train-labels-idx1-ubyte.gz'), labels)
    fashion_mnist.write_idx(str(tmp_path / 't10k-images-idx3-ubyte'), images[:2])
    fashion_mnist.write_idx(str(tmp_path / 't10k-labels-idx1-ubyte'), labels[:2])
    ds = create_dataset('fashion_mnist', root=str(tmp_path), split='train', input_img_mode='L')
    assert len(ds) == 7 and ds.targets == labels.tolist()
    assert np.array_equal(np.asarray(ds[2][0]), images[2])
    assert len(create_dataset('fashion_mnist', root=str(tmp_path), split='test')) == 2
    with pytest.raises(FileNotFoundError, match='--data-dir'):
        create_dataset('fashion_mnist', root=str(tmp_path / 'missing'), split='train')


def test_fashion_mnist_truncated_or_foreign_files(tmp_path):
    """A cut-off download, a .gz that is not gzip, a cut-off raw file: one ValueError naming the file."""
    images = np.zeros((7, 28, 28), dtype=np.uint8)
    fashion_mnist.write_idx(str(tmp_path / 'a.gz'), images)
    fashion_mnist.write_idx(str(tmp_path / 'b'), images)
    cut_gz, foreign, cut_raw = tmp_path / 'cut.gz', tmp_path / 'foreign.gz', tmp_path / 'cut'
    cut_gz.write_bytes((tmp_path / 'a.gz').read_bytes()[:40])
    foreign.write_bytes((tmp_path / 'b').read_bytes())
    cut_raw.write_bytes((tmp_path / 'b').read_bytes()[:1000])
    for path in (cut_gz, foreign, cut_raw):
        with pytest.raises(ValueError, match=f'{path.name} .*(truncated|not an idx).*copy the original file again'):
            fashion_mnist.read_idx(str(path))
    assert fashion_mnist.read_idx(str(tmp_path / 'a.gz')).shape == (7, 28, 28)


def test_fashion_mnist_subset_per_class_and_held_out(tmp_path):
    """make_subset keeps the first N of each class in file order; --classes keeps only the labels named."""
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 10, 200).astype(np.uint8)
    images = rng.integers(0, 256, (200, 28, 28), dtype=np.uint8)
    src = tmp_path / 'src'
    src.mkdir()
    for prefix in ('train', 't10k'):
        fashion_mnist.write_idx(str(src / f'{prefix}-images-idx3-ubyte.gz'), images)
        fashion_mnist.write_idx(str(src / f'{prefix}-labels-idx1-ubyte.gz'), labels)
    make_fashion_mnist_subset.main([str(src), str(tmp_path / 'in'), '--train-per-class', '3', '--test-per-class', '2',
                        '--classes', '1', '4', '7'])
    make_fashion_mnist_subset.make_subset(str(src), str(tmp_path / 'all'), 3, 2)
    seen = collections.Counter()   # naive: walk the file, keep a sample while its class has room
    expected = []
    for i, y in enumerate(labels.tolist()):
        if seen[y] < 3:
            seen[y] += 1
            expected.append(i)
    train_all = create_dataset('fashion_mnist', root=str(tmp_path / 'all'), split='train', input_img_mode='L')
    assert train_all.targets == labels[expected].tolist()
    assert np.array_equal(train_all.images, images[expected])
    train_in = create_dataset('fashion_mnist', root=str(tmp_path / 'in'), split='train')
    test_in = create_dataset('fashion_mnist', root=str(tmp_path / 'in'), split='validation')
    assert train_in.targets == [y for y in labels[expected].tolist() if y in (1, 4, 7)]
    assert collections.Counter(test_in.targets) == {1: 2, 4: 2, 7: 2}


def test_fashion_mnist_system_files_if_installed():
    """Debian's dataset-fashion-mnist, when present: the full 60000 / 10000 images."""
    folder = '/usr/share/datasets/fashion-mnist'
    if not os.path.isfile(os.path.join(folder, 't10k-labels-idx1-ubyte.gz')):
        pytest.skip('dataset-fashion-mnist not installed')
    assert len(create_dataset('fashion_mnist', root=folder, split='validation')) == 10000


# --- ImageFolder conversion -----------------------------------------------------------------------------------------

def test_to_imagefolder_cub(cub, tmp_path, capsys):
    root, classes = cub
    out = tmp_path / 'folder'
    counts = to_imagefolder_main(['--dataset', 'cub200', '--data-dir', str(root), '--out', str(out)])
    assert counts == {'train': 6, 'val': 3}
    assert (out / 'class_map.txt').read_text().split('\n')[:3] == classes          # names already sort: kept
    link = out / 'train' / classes[0] / 'Black_footed_Albatross_0001.jpg'
    assert link.is_symlink() and os.path.samefile(link, root / 'images' / classes[0] / link.name)
    from timm.data import create_dataset as timm_create_dataset
    for split, reader_split in (('train', 'train'), ('validation', 'validation')):
        folder_ds = timm_create_dataset('', root=str(out), split=split, class_map=str(out / 'class_map.txt'))
        ours = create_dataset('cub200', root=str(root), split=reader_split)
        got = sorted((os.path.basename(p), t) for p, t in folder_ds.reader.samples)
        want = sorted((os.path.basename(p), t) for p, t in ours.samples)
        assert got == want
    with pytest.raises(SystemExit, match='not empty'):
        to_imagefolder_main(['--dataset', 'cub200', '--data-dir', str(root), '--out', str(out)])


def test_to_imagefolder_class_folders(aircraft, tmp_path):
    root, variants, _, _ = aircraft
    out = tmp_path / 'air'
    to_imagefolder_main(['--dataset', 'fgvc_aircraft', '--data-dir', str(root), '--out', str(out)])
    assert (out / 'class_map.txt').read_text().splitlines() == ['707-320', 'Cessna 172', 'F_A-18']  # '/' replaced
    assert sorted(os.listdir(out / 'val')) == ['707-320', 'Cessna 172', 'F_A-18']
    # names that do not sort in label order get the label as prefix, so timm's sorted folders keep the labels
    assert class_folders(['T-shirt/top', 'Trouser', 'Bag']) == ['0.T-shirt_top', '1.Trouser', '2.Bag']
    assert class_folders(['c%d' % k for k in range(11)])[10] == 'c10'        # timm sorts naturally: c9 < c10


def test_subset_command_runs_without_warnings(tmp_path):
    """`python -m carrot_zzz.data.make_fashion_mnist_subset` is a command the package never imports itself: running it gives
    no "found in sys.modules" RuntimeWarning."""
    import subprocess
    p = subprocess.run([sys.executable, '-W', 'error::RuntimeWarning', '-m', 'carrot_zzz.data.make_fashion_mnist_subset',
                        '--help'], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and 'RuntimeWarning' not in p.stderr, p.stderr[-2000:]
