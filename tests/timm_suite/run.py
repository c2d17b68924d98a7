"""Run timm's own model tests (`tests/test_models.py` of the installed timm's source distribution) on the zoo.

    python tests/timm_suite/run.py            # CI: every test; the slow ones on the smallest model of each family
    python tests/timm_suite/run.py --full     # every test on every zoo model (slow: see README, Tests)
    python tests/timm_suite/run.py -- -k fx   # anything after `--` goes to pytest

The sdist is fetched with pip into a cache folder (never into the repository) and only its tests are
extracted, so `import timm` stays the installed timm. `zoo_timm_plugin.py` (loaded with `-p`) imports zoo
and keeps the (test, model) pairs that concern zoo models; its EXCLUDED table says which pairs are left out
and why. The exit code is pytest's.
"""
import argparse
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import timm

HERE = Path(__file__).resolve().parent
CACHE = Path(os.environ.get('ZOO_TIMM_TESTS_CACHE', Path.home() / '.cache' / 'zoo' / 'timm-tests'))
WANTED = ('tests/__init__.py', 'tests/conftest.py', 'tests/test_models.py', 'pyproject.toml')


def timm_tests(version: str = timm.__version__) -> Path:
    """The folder holding timm `version`'s tests, downloading its sdist with pip the first time."""
    root = CACHE / f'timm-{version}'
    if (root / 'tests' / 'test_models.py').is_file():
        return root
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        pip = subprocess.run(
            [sys.executable, '-m', 'pip', 'download', '--quiet', '--no-binary', ':all:', '--no-deps',
             f'timm=={version}', '--dest', tmp])
        sdists = list(Path(tmp).glob('timm-*.tar.gz'))
        if pip.returncode or len(sdists) != 1:
            raise SystemExit(
                f'run.py: pip could not download the source distribution of timm {version} (pip exit code '
                f'{pip.returncode}), which holds the tests to run; check the connection to PyPI')
        sdist, = sdists
        staging = Path(tmp) / 'extracted'
        with tarfile.open(sdist) as tar:
            top = f'timm-{version}/'
            for member in tar.getmembers():
                name = member.name.removeprefix(top)
                if member.isfile() and name in WANTED:  # four known regular files, nothing else
                    (staging / name).parent.mkdir(parents=True, exist_ok=True)
                    (staging / name).write_bytes(tar.extractfile(member).read())
        if not (staging / 'tests' / 'test_models.py').is_file():
            raise SystemExit(f'run.py: the timm {version} source distribution has no tests/test_models.py')
        staging.rename(root)  # atomic: a half-extracted folder never looks complete
    return root


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--full', action='store_true', help='run every zoo model, not the smallest per family')
    parser.add_argument('pytest_args', nargs='*', help='extra pytest arguments (after --)')
    args = parser.parse_args(argv)
    root = timm_tests()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(HERE), os.environ.get('PYTHONPATH')])))
    if args.full:
        env['ZOO_TIMM_SUITE_FULL'] = '1'
    cmd = [sys.executable, '-m', 'pytest', '-p', 'zoo_timm_plugin', '-q', '-ra', '-p', 'no:cacheprovider',
           str(root / 'tests' / 'test_models.py'), *args.pytest_args]
    return subprocess.run(cmd, cwd=root, env=env).returncode


if __name__ == '__main__':
    sys.exit(main())
