"""Hub folders and pretrained weights, end to end with the real clients.

timm (`local-dir:`, `hf-hub:`, `pretrained=True`), transformers (`AutoModelForImageClassification`) and
huggingface_hub (uploads, downloads, the offline cache) run unmodified; the Hub is the local fake in
tests/hub_server.py (fixture `hub` in conftest.py), so nothing leaves the machine.
"""
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
from huggingface_hub import HfApi

import zoo
import zoo.cards
import zoo.hub
from zoo._io import _file_mode
from zoo.errors import CheckpointError
from zoo.models import spartan
from zoo.models._builder import build_zoo_model

FIXTURES = Path(__file__).parent / 'fixtures' / 'spartan'
HUB_FILES = {'config.json', 'model.safetensors', 'README.md'}
OFFICIAL_REPO = 'henry-pay/SpaRTAN-S'  # spartan_tiny.in1k's hf_hub_id

# Every test runs against the local fake Hub with its own HF cache, so even an unexpected Hub call stays here.
pytestmark = pytest.mark.usefixtures('hub')


def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Redraw every float tensor (BN statistics and layer scales too), so that no part of the model is an
    identity and a tensor that failed to load changes the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith(('running_var', 'ls1.gamma', 'ls2.gamma')) or (t.dim() == 1 and name.endswith('weight')):
                t.uniform_(0.5, 1.5, generator=g)
            elif t.dim() >= 2 and t[0].numel() > 1:
                t.normal_(0., t[0].numel() ** -0.5, generator=g)
            else:
                t.normal_(0., 0.3, generator=g)
    return model.eval()


def make_model(seed: int = 0, **kwargs) -> torch.nn.Module:
    return randomize_(timm.create_model('spartan_tiny', num_classes=10, **kwargs), seed)


@torch.no_grad()
def run(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    assert not model.training
    return model(x)


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    """Models here are small (64 px inputs): one thread is as fast, and immune to a busy machine's other jobs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='module')
def x():
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope='module')
def saved(tmp_path_factory, x):
    """A randomized spartan_tiny (10 classes), its outputs on `x`, and the folder save_pretrained wrote."""
    model = make_model()
    folder = zoo.hub.save_pretrained(model, tmp_path_factory.mktemp('saved') / 'spartan')
    return model, run(model, x), folder


@pytest.fixture
def folder_copy(saved, tmp_path):
    return Path(shutil.copytree(saved[2], tmp_path / 'copy'))


# ---------------------------------------------------------------------------------------------------------------
# save_pretrained: one folder for timm and transformers


def test_save_pretrained_folder_loads_in_timm(saved, x):
    model, expected, folder = saved
    assert {p.name for p in folder.iterdir()} == HUB_FILES
    assert not [p for p in folder.parent.iterdir() if p.name.startswith('.zoo-save-')], 'staging folder left behind'
    assert {p.stat().st_mode & 0o777 for p in folder.iterdir()} == {_file_mode()}, 'readable like any file'
    config = json.loads((folder / 'config.json').read_text())
    assert config['architecture'] == 'spartan_tiny' and config['num_classes'] == 10
    assert 'num_classes' not in config.get('model_args', {})  # transformers' TimmWrapper fails on the duplicate
    assert (folder / 'README.md').read_text() == zoo.cards.model_card(model, config=config)
    assert safetensors.torch.load_file(folder / 'model.safetensors').keys() == model.state_dict().keys()

    loaded = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    assert type(loaded) is type(model)
    assert torch.equal(run(loaded, x), expected)
    assert expected.std() > 0.1  # the comparison is not between near-constant outputs


def test_save_pretrained_folder_loads_in_transformers(saved, x):
    from transformers import AutoModelForImageClassification

    model, expected, folder = saved
    hf_model = AutoModelForImageClassification.from_pretrained(folder).eval()
    assert type(hf_model).__name__ == 'TimmWrapperForImageClassification'
    assert hf_model.config.num_labels == 10
    with torch.no_grad():
        logits = hf_model(pixel_values=x).logits
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# push_to_hub, hf-hub: and the offline cache


def test_push_to_hub_round_trip_and_no_empty_commits(hub, saved, x):
    model, expected, _ = saved
    first = zoo.hub.push_to_hub(model, 'org/name')
    assert hub.commit_count('org/name') == 2  # the repo's initial commit, then ours
    assert set(hub.files('org/name')) == HUB_FILES | {'.gitattributes'}
    assert first.oid == hub.repo('org/name').branches['main']

    loaded = timm.create_model('hf-hub:org/name', pretrained=True).eval()
    assert torch.equal(run(loaded, x), expected)

    again = zoo.hub.push_to_hub(model, 'org/name')  # same weights, same card, same config
    assert hub.commit_count('org/name') == 2, 'pushing an unchanged model made a commit'
    assert again.oid == first.oid

    changed = make_model()
    with torch.no_grad():
        changed.head.fc.bias.add_(1.)
    third = zoo.hub.push_to_hub(changed, 'org/name')
    assert hub.commit_count('org/name') == 3 and third.oid != first.oid
    # the weights, and the config and card that record their sha256; .gitattributes is not re-sent
    assert sorted(hub.repo('org/name').resolve('main').changed) == ['README.md', 'config.json', 'model.safetensors']
    reloaded = timm.create_model('hf-hub:org/name', pretrained=True).eval()
    torch.testing.assert_close(run(reloaded, x), expected + 1., rtol=0, atol=1e-5)


def test_hf_hub_model_loads_offline_from_the_cache(hub, saved, x, tmp_path):
    model, expected, _ = saved
    zoo.hub.push_to_hub(model, 'org/name')
    timm.create_model('hf-hub:org/name', pretrained=True)  # online: fills the cache
    torch.save(x, tmp_path / 'x.pt')

    script = textwrap.dedent('''
        import sys, torch, timm, zoo
        from huggingface_hub import constants
        assert constants.HF_HUB_OFFLINE
        model = timm.create_model('hf-hub:org/name', pretrained=True).eval()
        with torch.no_grad():
            torch.save(model(torch.load(sys.argv[1])), sys.argv[2])
        try:  # nothing of this repo is cached: offline mode must refuse, not fetch
            timm.create_model('hf-hub:org/never-downloaded', pretrained=True)
        except Exception as e:
            print('uncached repo refused:', type(e).__name__)
        else:
            raise SystemExit('an uncached repo loaded while offline')
    ''')
    requests_before = len(hub.requests)
    env = {**os.environ, 'HF_HUB_OFFLINE': '1', 'OMP_NUM_THREADS': '1',
           'PYTHONPATH': str(Path(zoo.__file__).parent.parent)}
    proc = subprocess.run(
        [sys.executable, '-c', script, str(tmp_path / 'x.pt'), str(tmp_path / 'y.pt')],
        env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r'uncached repo refused:.*(LocalEntryNotFound|OfflineModeIsEnabled)', proc.stdout), proc.stdout
    assert len(hub.requests) == requests_before, f'offline load reached the Hub: {hub.requests[requests_before:]}'
    assert torch.equal(torch.load(tmp_path / 'y.pt'), expected)


# ---------------------------------------------------------------------------------------------------------------
# zoo.hub.load: round trips and clear errors


def test_load_round_trips_from_folder_and_hub(hub, saved, x):
    model, expected, folder = saved
    local = zoo.hub.load(folder)
    assert not local.training and torch.equal(run(local, x), expected)

    zoo.hub.push_folder(folder, 'org/name')
    remote = zoo.hub.load('org/name')
    assert not remote.training and torch.equal(run(remote, x), expected)


@pytest.mark.parametrize('damage', ['truncated', 'garbage'])
def test_load_refuses_a_corrupt_safetensors_file(folder_copy, damage):
    weights = folder_copy / 'model.safetensors'
    data = weights.read_bytes()
    weights.write_bytes(data[:len(data) // 2] if damage == 'truncated' else os.urandom(4096))
    with pytest.raises(CheckpointError, match='truncated or corrupt'):
        zoo.hub.load(folder_copy)


def test_load_refuses_an_unregistered_architecture(folder_copy):
    config_path = folder_copy / 'config.json'
    config = json.loads(config_path.read_text())
    config['architecture'] = 'spartan_gigantic'
    config_path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r'spartan_gigantic.*`import zoo`'):
        zoo.hub.load(folder_copy)


def test_load_refuses_weights_of_another_architecture(folder_copy):
    config = json.loads((folder_copy / 'config.json').read_text())
    del config['weights_sha256']  # without the record (a folder written by timm), strict loading still names the keys
    (folder_copy / 'config.json').write_text(json.dumps(config))
    resnet = timm.create_model('resnet18', num_classes=10)
    safetensors.torch.save_file(resnet.state_dict(), folder_copy / 'model.safetensors')
    with pytest.raises(CheckpointError) as info:
        zoo.hub.load(folder_copy)
    message = str(info.value)
    assert 'missing' in message and 'unexpected' in message
    assert '1012 keys missing' in message and 'stem.0.conv.weight' in message  # spartan's keys, none found
    assert re.search(r'\d+ keys unexpected \(first: (bn1|layer1)\.', message)  # and resnet's, named


def _fail_card(model, **kwargs):
    raise RuntimeError('card generation failed')


def _fail_weights(tensors, filename, *args, **kwargs):
    Path(filename).write_bytes(b'partial')  # a write that dies half-way, e.g. a full disk
    raise OSError(28, 'No space left on device')


@pytest.mark.parametrize('target, replacement', [
    ('zoo.cards.model_card', _fail_card),
    ('safetensors.torch.save_file', _fail_weights),
])
def test_failed_save_leaves_the_old_folder_intact(folder_copy, monkeypatch, target, replacement):
    before = {p.name: p.read_bytes() for p in folder_copy.iterdir()}
    monkeypatch.setattr(target, replacement)
    with pytest.raises((RuntimeError, OSError)):
        zoo.hub.save_pretrained(make_model(seed=5), folder_copy)
    assert {p.name: p.read_bytes() for p in folder_copy.iterdir()} == before
    assert [p.name for p in folder_copy.parent.iterdir() if p.name.startswith('.zoo-save-')] == []


# ---------------------------------------------------------------------------------------------------------------
# Official weights: the authors' layout, converted on load


class NotATensor:
    """Pickled into a checkpoint, this is what `weights_only=True` must refuse to rebuild."""

    def __init__(self):
        self.payload = 'anything'


def spartan_official_state_dict(model: spartan.SpaRTAN) -> dict:
    """The zoo state dict under the official SpaRTAN key names (henry-pay/SpaRTAN `src/model/spartan.py`).

    Written from the key scheme in tests/fixtures/spartan/README.md, independently of
    `checkpoint_filter_fn`, and checked key by key and shape by shape against the official manifest.
    """
    manifest = json.loads((FIXTURES / 'manifests' / 'spartan_t_repo_config.json').read_text())['state_dict']
    layer = {}  # zoo prefix -> official flat index: stage blocks, each stage but the last followed by its downsample
    for i, stage in enumerate(model.stages):
        if i:
            layer[f'stages.{i}.downsample.'] = len(layer)
        for j in range(len(stage.blocks)):
            layer[f'stages.{i}.blocks.{j}.'] = len(layer)
    block_renames = [
        (r'^norm(\d)\.', r'norm_\1.'), (r'^ls(\d)\.gamma$', r'scale_\1'), (r'\.bn\.', '.norm.'),
        (r'^smixer\.l_conv\.0\.weight$', 'smixer.l_conv.0.conv.weight'),
        (r'attn\.fc1\.', 'attn.squeeze.'), (r'attn\.fc2\.', 'attn.expand.'),
    ]
    out = {}
    for key, value in model.state_dict().items():
        if key.startswith('stem.'):
            name = 'conv.' + key[len('stem.'):].replace('.bn.', '.norm.')
        elif key.startswith('head.fc.'):
            name = 'linear.' + key[len('head.fc.'):]
        else:
            prefix = re.match(r'^stages\.\d+\.(downsample|blocks\.\d+)\.', key).group(0)
            rest = key[len(prefix):]
            if prefix.endswith('downsample.'):
                rest = re.sub(r'^bn\.', 'norm.', rest)
            else:
                for pattern, replacement in block_renames:
                    rest = re.sub(pattern, replacement, rest)
            name = f'layers.{layer[prefix]}.{rest}'
        shape = manifest[name]
        if re.search(r'\.scale_\d$', name):  # (C,) in the zoo, (1, C, 1, 1) officially
            value = value.reshape(shape)
        assert list(value.shape) == shape, f'{key} -> {name}: {list(value.shape)} vs manifest {shape}'
        out[name] = value.clone()
    assert out.keys() == manifest.keys()
    return out


def _upload(api: HfApi, data, path_in_repo: str) -> None:
    api.upload_file(path_or_fileobj=data, path_in_repo=path_in_repo, repo_id=OFFICIAL_REPO)


def test_official_weights_download_convert_and_verify(hub, tmp_path, x):
    source = randomize_(timm.create_model('spartan_tiny'), seed=3)  # full size, 1000 classes, as published
    expected = run(source, x)
    checkpoint = tmp_path / 'spartan.pth'
    torch.save({'epoch': 1, 'model': spartan_official_state_dict(source)}, checkpoint)
    api = HfApi()
    api.create_repo(OFFICIAL_REPO)
    _upload(api, checkpoint, 'spartan.pth')

    loaded = timm.create_model('spartan_tiny', pretrained=True).eval()
    assert torch.equal(run(loaded, x), expected)
    loaded = timm.create_model('zoo/SpaRTAN_tiny', pretrained=True).eval()
    assert torch.equal(run(loaded, x), expected)
    assert 'state_dict' not in loaded.pretrained_cfg
    # timm's adaptations apply to converted official weights as to timm's own: a new head, a features_only wrap
    body = timm.create_model('spartan_tiny', pretrained=True, num_classes=10).eval()
    with torch.no_grad():
        assert torch.equal(body.forward_features(x), source.forward_features(x))
    features = timm.create_model('spartan_tiny', pretrained=True, features_only=True).eval()
    with torch.no_grad():
        for got, want in zip(features(x), source.forward_intermediates(x, intermediates_only=True), strict=True):
            assert torch.equal(got, want)

    def build(sha256):
        return build_zoo_model(
            spartan.SpaRTAN, 'spartan_tiny', pretrained=True, weight_sha256={'spartan_tiny.in1k': sha256},
            pretrained_filter_fn=spartan.checkpoint_filter_fn,
            dims=(32, 64, 128, 256), depths=(3, 3, 12, 2), expand_ratios=(4, 4, 2, 2)).eval()

    good = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert torch.equal(run(build(good), x), expected)
    with pytest.raises(CheckpointError, match='sha256'):
        build('0' * 64)

    # a second weight file makes the choice ambiguous: refused, naming both
    _upload(api, checkpoint, 'spartan_copy.pth')
    with pytest.raises(CheckpointError, match=r'2 weight files.*spartan\.pth.*spartan_copy\.pth'):
        timm.create_model('spartan_tiny', pretrained=True)
    api.delete_file('spartan_copy.pth', repo_id=OFFICIAL_REPO)

    # a checkpoint that unpickles more than tensors is never loaded
    torch.save({'epoch': 1, 'model': spartan_official_state_dict(source), 'args': NotATensor()}, checkpoint)
    _upload(api, checkpoint, 'spartan.pth')
    with pytest.raises(CheckpointError, match='weights_only'):
        timm.create_model('spartan_tiny', pretrained=True)
