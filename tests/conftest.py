"""Shared fixtures. `hub`: the real huggingface_hub client talking to a local fake Hub (tests/hub_server.py)."""
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests/hub_server.py, importable from any rootdir

from hub_server import FakeHub  # noqa: E402

# Nothing in the suite may reach the real Hub or send telemetry, even a test that forgets the fixture.
os.environ.setdefault('HF_HUB_DISABLE_TELEMETRY', '1')
os.environ.setdefault('HF_HUB_DISABLE_PROGRESS_BARS', '1')
os.environ.setdefault('HF_HUB_DISABLE_UPDATE_CHECK', '1')

DUMMY_TOKEN = 'hf_zoo_dummy_token_for_the_fake_hub'


@pytest.fixture(scope='session')
def hub_server():
    """The fake Hub, serving on 127.0.0.1 in a thread for the whole session."""
    with FakeHub() as server:
        yield server


def hub_env(endpoint: str, home: Path) -> dict:
    """Environment that points huggingface_hub (in this process or a child) at `endpoint`, caching under `home`."""
    return {
        'HF_ENDPOINT': endpoint,
        'HF_HOME': str(home),
        'HF_HUB_CACHE': str(home / 'hub'),
        'HF_ASSETS_CACHE': str(home / 'assets'),
        'HF_XET_CACHE': str(home / 'xet'),
        'HF_TOKEN': DUMMY_TOKEN,
        'HF_HUB_DISABLE_TELEMETRY': '1',
        'HF_HUB_DISABLE_PROGRESS_BARS': '1',
        'HF_HUB_DISABLE_UPDATE_CHECK': '1',
        'HF_HUB_DISABLE_XET': '1',
        'TORCH_HOME': str(home / 'torch'),
    }


@pytest.fixture
def hub(hub_server, tmp_path, monkeypatch):
    """The fake Hub, emptied, as huggingface_hub's endpoint for this test, with a fresh cache and a dummy token.

    huggingface_hub reads its environment once, at import, into `huggingface_hub.constants`; the
    environment is set too (for `subprocess` children and code that reads os.environ), and the constants
    that were already read are patched, in `constants` and in every huggingface_hub module that imported one
    by name (0.34's `file_download` holds its own URL template).
    """
    from huggingface_hub import constants

    hub_server.reset()
    home = tmp_path / 'hf_home'
    env = hub_env(hub_server.endpoint, home)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for key in ('HF_HUB_OFFLINE', 'TRANSFORMERS_OFFLINE', 'HF_TOKEN_PATH', 'HUGGINGFACE_HUB_CACHE'):
        monkeypatch.delenv(key, raising=False)
    patched = {
        'ENDPOINT': hub_server.endpoint,
        'HUGGINGFACE_CO_URL_TEMPLATE': hub_server.endpoint + '/{repo_id}/resolve/{revision}/{filename}',
        'HF_HOME': env['HF_HOME'],
        'HF_HUB_CACHE': env['HF_HUB_CACHE'],
        'HUGGINGFACE_HUB_CACHE': env['HF_HUB_CACHE'],
        'HF_ASSETS_CACHE': env['HF_ASSETS_CACHE'],
        'HUGGINGFACE_ASSETS_CACHE': env['HF_ASSETS_CACHE'],
        'HF_XET_CACHE': env['HF_XET_CACHE'],
        'HF_TOKEN_PATH': str(home / 'token'),
        'HF_STORED_TOKENS_PATH': str(home / 'stored_tokens'),
        'AGENT_HARNESSES_PATH': str(home / '.agent_harnesses.json'),
        'CHECK_FOR_UPDATE_DONE_PATH': str(home / '.check_for_update_done'),
        'CHECK_FOR_SKILL_UPDATE_DONE_PATH': str(home / '.check_for_skill_update_done'),
        'HF_HUB_OFFLINE': False,
        'HF_HUB_DISABLE_TELEMETRY': True,
        'HF_HUB_DISABLE_XET': True,
    }
    modules = {constants} | {m for n, m in sys.modules.items() if n.startswith('huggingface_hub.')}
    for module in modules:
        for name, value in patched.items():
            if name in vars(module):
                monkeypatch.setattr(module, name, value)
    yield hub_server
    assert not hub_server.errors, f'the fake Hub failed: {hub_server.errors}'
    assert not hub_server.unhandled, f'huggingface_hub called routes the fake Hub lacks: {hub_server.unhandled}'


@pytest.fixture
def one_thread():
    """One torch thread for tests of tiny models: more only oversubscribes a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
