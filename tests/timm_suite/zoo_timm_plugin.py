"""pytest plugin for timm's `tests/test_models.py`: import zoo, keep the (test, model) pairs about zoo models.

Importing zoo here, before pytest imports timm's test module, puts the zoo's models into the
`timm.list_models()` lists that module parametrises its tests with. Every test whose `model_name` is a zoo
model (the zoo's own names and the timm names it takes over: convit_*, inception_v4, inception_resnet_v2,
halonet_h1) is kept, and so are timm's unparametrised tests that build one of them.
"""
import fnmatch
import os

import pytest
import timm

import zoo

ZOO_MODELS = set(zoo.list_models())

# timm tests without a model_name parameter that build a model the zoo registers.
NAMED_TESTS = {'test_convit_dtype_change_after_forward': 'convit_tiny'}

# Tests too slow for CI on 2 CPU cores: in CI they run on the smallest variant of each family only
# (`run.py --full` runs them on every model).
SLOW_TESTS = {
    'test_model_forward', 'test_model_backward', 'test_model_forward_torchscript', 'test_model_forward_features',
    'test_model_forward_intermediates_features', 'test_model_forward_intermediates', 'test_model_forward_fx',
    'test_model_backward_fx', 'test_model_forward_fx_torchscript', 'test_prune_intermediate_layers_contract',
}
SMALLEST = {
    'convit_tiny', 'halonet_h0', 'inception_v4', 'inception_resnet_v1', 'spartan_tiny', 'unireplknet_a',
    'idisc_resnet101', 'timesnet_convnext_tiny_convnext_tiny', 'macmd_pvt_v2_b2', 'hnerv_0_35m', 'nerv_s',
    'nervpp_xs',
}

DENSE = ('idisc_*', 'timesnet_*', 'macmd_*')
VIDEO = ('hnerv_*', 'nerv_*', 'nervpp_*')

# (test, model pattern) -> why timm's assumption cannot hold for that model. A reviewer should agree with each.
# What the dense and video models do owe timm (a cfg describing a real input, forward and backward at that size,
# num_classes=0, num_features / head_hidden_size) is checked by tests/test_model_contract.py.
EXCLUDED = {
    ('test_model_load_pretrained', '*'): 'downloads weights from the Hugging Face Hub; the suite runs offline '
                                         "(timm's own CI skips it too)",
    ('test_model_features_pretrained', '*'): 'downloads weights from the Hugging Face Hub; the suite runs offline',
    ('test_model_forward_features', 'inception_resnet_v1'):
        'asserts every feature map is larger than input / (2 x reduction), which unpadded (VALID) convs cannot '
        "meet at 96 px; timm exempts its own unpadded Inceptions (inception_v3*, inception_v4*, "
        'inception_resnet_v2*) from that assertion by name, and the paper\'s Inception-ResNet-v1 is one too',
    **{('test_model_default_cfgs', pattern):
        'checks the classifier API: forward_head(pre_logits=True), reset_classifier(0) and num_classes=0 must '
        "give a pooled (N, head_hidden_size) vector and forward_features a map of the cfg's pool_size; a depth, "
        'segmentation or video model outputs maps or frames (num_classes=0 gives the map its head reads)'
       for pattern in DENSE + VIDEO},
    **{('test_model_forward_features', pattern):
        "features_only wraps a backbone's stages; a dense or video model is not a backbone and refuses "
        'features_only with one clear error (its encoder is a timm model that has features_only)'
       for pattern in DENSE + VIDEO},
    **{(test, 'idisc_*'): 'builds the model with num_classes=42; iDisc predicts depth or surface normals and has '
                          'no classes (num_classes=0 only)'
       for test in ('test_model_backward', 'test_model_backward_fx')},
    **{(test, 'timesnet_*'): 'builds the model with num_classes=42; the registered ×Net models predict depth, one '
                             'output channel (num_classes=1, or 0 for no head)'
       for test in ('test_model_backward', 'test_model_backward_fx')},
    **{(test, 'macmd_*'): 'asserts the 42 classes are on the last axis of the output; segmentation logits carry '
                          'them on axis 1, (N, 42, H, W)'
       for test in ('test_model_backward', 'test_model_backward_fx')},
    **{(test, pattern): 'feeds random images of up to 384 px; a video model decodes frames of the one size it was '
                        'fitted to (HNeRV takes frames of that size, NeRV and NeRV++ take frame indices)'
       for test in ('test_model_forward', 'test_model_backward', 'test_model_forward_fx', 'test_model_backward_fx',
                    'test_model_forward_torchscript', 'test_model_forward_fx_torchscript')
       for pattern in VIDEO},
}


# timm picks the models for these tests by the module that registered them (its FEAT_INTER_FILTERS), a list
# of timm's own modules; the zoo's classifiers implement the same forward_intermediates API, so they join.
BY_MODULE_TESTS = (
    'test_model_forward_intermediates', 'test_model_forward_intermediates_features',
    'test_prune_intermediate_layers_contract',
)
CLASSIFIER_FAMILIES = ['convit', 'halonet', 'inception', 'spartan', 'unireplknet']
CLASSIFIERS = sorted(ZOO_MODELS.intersection(timm.list_models(module=CLASSIFIER_FAMILIES)))


@pytest.hookimpl(tryfirst=True)
def pytest_generate_tests(metafunc):
    if metafunc.definition.originalname not in BY_MODULE_TESTS:
        return
    for marker in metafunc.definition.iter_markers('parametrize'):
        if marker.args[0] == 'model_name':
            marker.args[1].extend(n for n in CLASSIFIERS if n not in marker.args[1])


def _model_name(item):
    """The registry name an item tests (`unireplknet_a.in1k` -> `unireplknet_a`), or None."""
    callspec = getattr(item, 'callspec', None)
    name = callspec.params.get('model_name') if callspec is not None else NAMED_TESTS.get(item.originalname)
    return name.split('.')[0] if isinstance(name, str) else None


def pytest_collection_modifyitems(config, items):
    full = os.environ.get('ZOO_TIMM_SUITE_FULL') == '1'
    keep, drop, slow = [], [], 0
    for item in items:
        name = _model_name(item)
        test = item.originalname
        if name not in ZOO_MODELS or (not full and test in SLOW_TESTS and name not in SMALLEST):
            drop.append(item)
            slow += name in ZOO_MODELS
            continue
        for (excluded_test, pattern), reason in EXCLUDED.items():
            if test == excluded_test and fnmatch.fnmatch(name, pattern):
                item.add_marker(pytest.mark.skip(reason=f'zoo exclusion: {reason}'))
        keep.append(item)
    config.hook.pytest_deselected(items=drop)
    items[:] = keep
    config.zoo_slow_deselected = slow


def pytest_terminal_summary(terminalreporter, config):
    """One line of (test, model) pair counts: ran, passed, failed, left out by EXCLUDED, skipped by timm's
    own size limits, and (without --full) the slow tests' pairs on models other than the smallest per family."""
    stats = terminalreporter.stats
    skipped = stats.get('skipped', [])
    excluded = sum('zoo exclusion:' in str(report.longrepr) for report in skipped)
    passed, failed = len(stats.get('passed', [])), len(stats.get('failed', [])) + len(stats.get('error', []))
    terminalreporter.write_line(
        f'zoo: {passed + failed} (test, model) pairs ran: {passed} passed, {failed} failed; {excluded} excluded '
        f'(EXCLUDED), {len(skipped) - excluded} skipped by timm, '
        f'{getattr(config, "zoo_slow_deselected", 0)} deselected (slow tests beyond the smallest model per family)')


def pytest_configure(config):
    config.addinivalue_line('markers', 'timeout(seconds): read by pytest-timeout where installed')
