"""Every Hub folder says what its weights are, records their sha256, and loading checks it; failed fetches of
weights say what to do, and a local file replaces any download.

The provenance cases (random, official, fine-tuned, zoo-trained, the demo fit) each get the right config.json
and card, and each card's usage snippet runs as written from inside its folder.
"""
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
from huggingface_hub import ModelCard

import zoo
from zoo import hub
from zoo.errors import CheckpointError, WeightsUnavailableError
from zoo.models import hnerv, spartan
from zoo.models._builder import sha256_file, weights_fingerprint
from zoo.train import trainer
from official_layout import load_manifest, quantized_bunny_release, to_official_layout

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def no_network(monkeypatch):
    """Every socket connection and name lookup fails, as on a machine without network."""
    def refuse(*args, **kwargs):
        raise OSError('network access blocked by the test')

    monkeypatch.setattr(socket.socket, 'connect', refuse)
    monkeypatch.setattr(socket, 'create_connection', refuse)
    monkeypatch.setattr(socket, 'getaddrinfo', refuse)


def randomized(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=g) * 0.05 + (1. if t.dim() == 1 else 0.))
    return model.eval()


def official_spartan_file(tmp_path: Path, seed: int = 3):
    """A full-size spartan_tiny in the authors' layout (tests/official_layout.py), and the model it came from."""
    source = randomized(timm.create_model('spartan_tiny'), seed)
    manifest = load_manifest('spartan', 'spartan_t_repo_config')
    official = to_official_layout(source.state_dict(), source, spartan.checkpoint_filter_fn, manifest)
    path = tmp_path / 'spartan_official.pth'
    torch.save({'epoch': 300, 'model': official}, path)
    return path, source


def read(folder: Path):
    return json.loads((folder / 'config.json').read_text()), (folder / 'README.md').read_text()


def run_usage(folder: Path, monkeypatch) -> dict:
    """Run the card's usage snippet as written, from inside the folder; returns its variables."""
    code = re.search(r'## Usage\n\n```python\n(.*?)```', (folder / 'README.md').read_text(), re.S).group(1)
    monkeypatch.chdir(folder)
    namespace = {}
    exec(compile(code, str(folder / 'README.md'), 'exec'), namespace)
    return namespace


# ---------------------------------------------------------------------------------------------------------------
# Provenance: what each folder says


def test_random_model_claims_no_tag_or_description(tmp_path, monkeypatch):
    folder = hub.save_pretrained(timm.create_model('spartan_tiny.in1k', num_classes=10), tmp_path / 'random')
    config, card = read(folder)
    assert config['provenance'] == {'kind': 'random'}
    assert config['results'] == []
    assert 'tag' not in config['pretrained_cfg'] and 'description' not in config['pretrained_cfg']
    assert 'Official' not in card and 'in1k' not in card
    assert '# Model card for spartan_tiny\n' in card and 'these weights are untrained' in card
    assert f'`{sha256_file(folder / "model.safetensors")}`' in card
    namespace = run_usage(folder, monkeypatch)
    assert namespace['x'].shape == (1, 3, 256, 256) and namespace['top5'].values.shape == (1, 5)


def test_official_file_offline_gives_an_official_folder(tmp_path, monkeypatch, no_network):
    path, source = official_spartan_file(tmp_path)
    model = timm.create_model('spartan_tiny.in1k', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), source(x))
    folder = hub.save_pretrained(model, tmp_path / 'official')
    config, card = read(folder)
    provenance = config['provenance']
    assert provenance['kind'] == 'official' and provenance['tag'] == 'in1k'
    assert provenance['file'] == path.name and provenance['file_sha256'] == sha256_file(path)
    assert config['pretrained_cfg']['tag'] == 'in1k'  # these are the tag's weights, so the tag stays
    assert '# Model card for spartan_tiny.in1k' in card and sha256_file(path) in card
    assert 'Official ImageNet-1k checkpoint from the SpaRTAN authors' in card
    assert 'model-index' not in card  # nothing was measured on them
    assert "The paper's figures are for the authors' weights" not in card
    namespace = run_usage(folder, monkeypatch)
    assert namespace['model'].zoo_weights['provenance'] == provenance


def test_fine_tuned_model_says_from_what(tmp_path, monkeypatch, no_network):
    path, _ = official_spartan_file(tmp_path)
    model = timm.create_model('spartan_tiny.in1k', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    with torch.no_grad():
        model.head.fc.bias.add_(0.1)  # any change the zoo did not make itself
    config, card = read(hub.save_pretrained(model, tmp_path / 'changed'))
    assert config['provenance']['kind'] == 'fine-tuned' and config['provenance']['from']['kind'] == 'official'
    assert 'how is not recorded' in config['provenance']['how']
    assert 'tag' not in config['pretrained_cfg'] and 'Official ImageNet-1k checkpoint' not in card

    recipe = trainer.load_recipe(REPO / 'training' / 'recipes' / 'spartan_tiny.yaml')
    folder = trainer.save_trained(model, tmp_path / 'fine-tuned', recipe, {'top1': 0.5, 'loss': 1.25}, data='/data/pets')
    config, card = read(folder)
    provenance = config['provenance']
    assert provenance['kind'] == 'fine-tuned' and provenance['from']['file_sha256'] == sha256_file(path)
    assert provenance['data'] == '/data/pets' and provenance['metrics'] == {'top1': 0.5, 'loss': 1.25}
    assert f"**Fine-tuned** from the authors' checkpoint `{path.name}` from `{path}`, sha256" in card
    (result,) = config['results']
    assert result['metrics'] == {'top1': 0.5, 'loss': 1.25} and result['weights_sha256'] == config['weights_sha256']
    assert result['dataset'] == '/data/pets' and result['split'] == 'validation'  # the recipe's eval split
    (index,) = ModelCard(card).data.eval_results[:1]  # the Hub's own parser reads the model-index block
    assert index.metric_type == 'top1' and index.metric_value == 0.5 and index.dataset_name == '/data/pets'
    namespace = run_usage(folder, monkeypatch)
    assert namespace['top5'].values.shape == (1, 5)


def test_zoo_trained_model_carries_recipe_data_metrics_and_sha(tmp_path, monkeypatch):
    recipe = trainer.load_recipe(REPO / 'training' / 'recipes' / 'spartan_tiny.yaml')
    model = zoo.create_model('spartan_tiny', num_classes=2)
    folder = trainer.save_trained(model, tmp_path / 'trained', recipe, {'top1': 0.0, 'top5': 1.0}, data='/data/two')
    config, card = read(folder)
    provenance = config['provenance']
    assert provenance['kind'] == 'zoo-trained' and provenance['recipe']['model'] == 'spartan_tiny'
    assert provenance['data'] == '/data/two' and provenance['metrics'] == {'top1': 0.0, 'top5': 1.0}
    assert json.loads((folder / 'training.json').read_text())['weights_sha256'] == config['weights_sha256']
    assert 'Official' not in card and 'in1k' not in card and '**Trained by the zoo**' in card
    assert card.count(config['weights_sha256']) >= 2  # the weights section and the training section
    namespace = run_usage(folder, monkeypatch)
    assert namespace['top5'].values.shape == (1, 2)  # the folder's own model, not spartan_tiny.in1k


def test_demo_fit_card_feeds_frames_of_the_fitted_size(tmp_path, monkeypatch):
    recipe = trainer.load_recipe(REPO / 'training' / 'recipes' / 'hnerv_demo.yaml', [
        'data.demo_clip.num_frames=2', 'model_args.frame_size=[48, 96]', 'model_args.enc_strides=[3, 2, 2, 2, 2]',
        'train.epochs=1', 'train.warmup_epochs=0'])
    trainer.train(recipe, tmp_path / 'run', quiet=True)
    folder = tmp_path / 'run' / 'model'
    config, card = read(folder)
    assert config['provenance']['kind'] == 'zoo-trained'
    (result,) = config['results']
    assert result['split'] == 'the fitted frames' and result['protocol']['checkpoint'].startswith('last, step ')
    assert config['pretrained_cfg']['input_size'] == [3, 48, 96]
    assert 'No weights are published' not in card and 'untrained' not in card and '**Trained by the zoo**' in card
    assert '640, 1280' not in card and 'torch.rand(2, 3, 48, 96)' in card
    namespace = run_usage(folder, monkeypatch)
    assert namespace['reconstruction'].shape == (2, 3, 48, 96)


def test_folder_card_rerenders_from_config_with_measured_results(tmp_path):
    folder = hub.save_pretrained(timm.create_model('spartan_tiny', num_classes=3), tmp_path / 'f')
    config, before = read(folder)
    config['results'].append({
        'task': 'image-classification', 'dataset': 'digits', 'split': 'test', 'metrics': {'top1': 0.25},
        'protocol': {'resize': 256}, 'weights_sha256': config['weights_sha256'], 'date': '2026-12-02',
        'command': 'zoo validate'})
    config['results'].append(dict(config['results'][0], weights_sha256='0' * 64, metrics={'top1': 0.99}))
    (folder / 'config.json').write_text(json.dumps(config))
    hub.write_folder_card(folder)
    card = (folder / 'README.md').read_text()
    assert card != before and 'model-index:' in card and 'value: 0.25' in card
    assert '0.99' not in card  # a result for other weights is not shown


# ---------------------------------------------------------------------------------------------------------------
# Integrity


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
    model = randomized(timm.create_model('spartan_tiny', num_classes=10), seed=0)
    return hub.save_pretrained(model, tmp_path_factory.mktemp('saved') / 'spartan')


def _flip_byte_in(folder: Path, tensor_name: str) -> None:
    weights = folder / 'model.safetensors'
    data = bytearray(weights.read_bytes())
    header_len = int.from_bytes(data[:8], 'little')
    start, end = json.loads(data[8:8 + header_len])[tensor_name]['data_offsets']
    data[8 + header_len + (start + end) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))


def test_flipped_byte_is_refused_naming_both_digests(saved, tmp_path):
    folder = Path(shutil.copytree(saved, tmp_path / 'copy'))
    recorded = json.loads((folder / 'config.json').read_text())['weights_sha256']
    _flip_byte_in(folder, 'head.fc.weight')
    actual = sha256_file(folder / 'model.safetensors')
    for load in (lambda: hub.load(folder), lambda: timm.create_model(f'local-dir:{folder}', pretrained=True)):
        with pytest.raises(CheckpointError) as info:
            load()
        assert recorded in str(info.value) and actual in str(info.value)


def test_weights_of_another_spartan_are_refused(saved, tmp_path):
    folder = Path(shutil.copytree(saved, tmp_path / 'copy'))
    other = randomized(timm.create_model('spartan_tiny', num_classes=10), seed=1)
    safetensors.torch.save_file(other.state_dict(), folder / 'model.safetensors')
    with pytest.raises(CheckpointError, match='records weights_sha256'):
        hub.load(folder)


def test_hf_hub_folder_is_checked(hub, saved, tmp_path):
    hub_client = zoo.hub
    hub_client.push_folder(saved, 'org/good')
    assert timm.create_model('hf-hub:org/good', pretrained=True).zoo_weights['provenance']['kind'] == 'unknown'
    folder = Path(shutil.copytree(saved, tmp_path / 'bad'))
    _flip_byte_in(folder, 'stem.0.conv.weight')
    hub_client.push_folder(folder, 'org/bad')
    with pytest.raises(CheckpointError, match='records weights_sha256'):
        timm.create_model('hf-hub:org/bad', pretrained=True)
    with pytest.raises(CheckpointError, match='records weights_sha256'):
        hub_client.load('org/bad')


def test_folder_without_the_record_still_loads(tmp_path):
    model = randomized(timm.create_model('spartan_tiny', num_classes=10), seed=2)
    timm.models.save_for_hf(model, tmp_path / 'timm_folder', safe_serialization=True)  # timm's own writer
    x = torch.randn(1, 3, 64, 64)
    for loaded in (timm.create_model(f'local-dir:{tmp_path / "timm_folder"}', pretrained=True), hub.load(tmp_path / 'timm_folder')):
        with torch.no_grad():
            assert torch.equal(loaded.eval()(x), model(x))
        assert loaded.zoo_weights['provenance'] == {'kind': 'unknown'}


# ---------------------------------------------------------------------------------------------------------------
# Failed downloads, and local files instead of downloads


@pytest.mark.parametrize('name, filename', [
    ('hnerv_1_5m.bunny', 'quant_vid.pth'),
    ('idisc_resnet101.nyu', 'nyu_resnet101.pt'),
])
def test_unreachable_url_says_what_to_do(name, filename, no_network, tmp_path, monkeypatch):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path))
    with pytest.raises(WeightsUnavailableError) as info:
        timm.create_model(name, pretrained=True)
    message = str(info.value)
    url = timm.models.get_pretrained_cfg(name).url
    assert filename in message and url in message and 'pretrained_cfg_overlay=dict(file=' in message
    assert len(message.splitlines()) == 1


def test_hub_weights_offline_say_what_to_do(hub, monkeypatch):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
    with pytest.raises(WeightsUnavailableError, match=r'timm/convit_tiny\.fb_in1k.*pretrained_cfg_overlay=dict\(file='):
        timm.create_model('convit_tiny.fb_in1k', pretrained=True)
    with pytest.raises(WeightsUnavailableError, match='pretrained encoder weights of macmd_pvt_v2_b2'):
        timm.create_model('macmd_pvt_v2_b2', pretrained=True)  # the encoder is fetched by timm, inside the model


def test_bunny_release_loads_from_a_local_file_offline(tmp_path, monkeypatch, no_network):
    release = quantized_bunny_release(load_manifest('hnerv', 'hnerv_bunny_1_5m'))
    path = tmp_path / 'quant_vid.pth'
    torch.save(release, path)
    with pytest.raises(CheckpointError, match='has sha256'):  # not the published file: its recorded sha256 differs
        timm.create_model('hnerv_1_5m.bunny', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    monkeypatch.setitem(hnerv.WEIGHT_SHA256, 'hnerv_1_5m.bunny', sha256_file(path))
    model = timm.create_model('hnerv_1_5m.bunny', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    assert torch.all(model.decoder.blocks[2].conv.weight == 0.25)  # -0.5 + 0.25 * 3
    assert model.zoo_weights['provenance']['kind'] == 'official'
    with pytest.raises(WeightsUnavailableError, match='does not exist'):
        timm.create_model('hnerv_1_5m.bunny', pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / 'nope')))

    # converted outside timm (zoo.convert, `zoo convert`): the file's sha256 names the release it is
    converted, _ = hnerv.load_quantized_release(path)
    provenance = converted.zoo_weights['provenance']
    assert provenance['release'] == 'hnerv_1_5m.bunny' and provenance['file_sha256'] == sha256_file(path)
    config, card = read(hub.save_pretrained(converted, tmp_path / 'bunny'))
    assert config['pretrained_cfg']['tag'] == 'bunny' and 'the published `hnerv_1_5m.bunny` release' in card


def test_predict_without_published_weights_fails_at_once(tmp_path, capsys):
    from zoo.cli import main
    assert main(['predict', 'macmd_pvt_v2_b2', str(tmp_path / 'x.png')]) == WeightsUnavailableError.exit_code
    message = capsys.readouterr().err
    assert 'no published weights' in message and '--random' in message and len(message.splitlines()) == 1


# ---------------------------------------------------------------------------------------------------------------
# transformers without `import zoo`


def test_automodel_without_zoo_is_explained_by_the_card(saved):
    card = (saved / 'README.md').read_text()
    assert '`import zoo`' in card and 'not supported in your version of timm' in card and 'Unknown model' in card
    script = textwrap.dedent('''
        import sys
        from transformers import AutoModelForImageClassification
        try:
            AutoModelForImageClassification.from_pretrained(sys.argv[1])
        except Exception as e:
            print('without zoo:', type(e).__name__, e)
        import zoo
        model = AutoModelForImageClassification.from_pretrained(sys.argv[1])
        print('with zoo:', model.config.num_labels)
    ''')
    env = {**os.environ, 'PYTHONPATH': str(REPO), 'OMP_NUM_THREADS': '1', 'HF_HUB_OFFLINE': '1'}
    proc = subprocess.run([sys.executable, '-c', script, str(saved)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # newer transformers' message, or older ones' (timm's own), as the card quotes both
    assert re.search(r"without zoo: .*('spartan_tiny' is not supported in your version of timm|Unknown model "
                     r"\(spartan_tiny\))", proc.stdout)
    assert 'with zoo: 10' in proc.stdout


def test_fingerprint_of_a_tensor_larger_than_float32_counts_exactly():
    """unireplknet_xl has 18,874,368-element tensors: float32 index arithmetic sampled past the end of them."""
    module = torch.nn.Module()
    module.register_buffer('big', torch.zeros(18_874_368, dtype=torch.uint8))
    before = weights_fingerprint(module)
    module.big[-1] = 1  # the last element is one of the sampled ones; the sum changes too
    assert weights_fingerprint(module) != before
