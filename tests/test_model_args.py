"""Counts, sizes and rates a classifier cannot be built with are refused when it is built, naming the argument."""
import pytest
import timm
import torch

import zoo
from zoo.errors import InputError


@pytest.mark.parametrize('name, kwargs, message', [
    ('spartan_tiny', dict(in_chans=0), 'in_chans must be an integer >= 1, got 0'),
    ('spartan_tiny', dict(num_classes='10'), "num_classes must be an integer >= 0, got '10'"),
    ('spartan_tiny', dict(num_classes=True), 'num_classes must be an integer'),
    ('unireplknet_a', dict(num_classes=-3), 'num_classes must be an integer >= 0, got -3'),
    ('unireplknet_a', dict(depths=(2, 2, -1, 2)), r'depths must be an integer >= 0 \(each\)'),
    ('halonet_h0', dict(block_size=0), 'block_size must be an integer >= 1'),
    ('halonet_h0', dict(in_chans=-1), 'in_chans must be an integer >= 1'),
    ('convit_tiny', dict(img_size=-5), 'img_size must be an integer >= 1'),
    ('inception_v4', dict(drop_rate=1.5), r'drop_rate must be a number in \[0, 1\)'),
    ('inception_resnet_v1', dict(num_classes=2.5), 'num_classes must be an integer'),
])
def test_bad_constructor_arguments_are_refused_at_construction(name, kwargs, message):
    with pytest.raises(InputError, match=f'{name}: {message}'):
        timm.create_model(name, **kwargs)


def test_good_arguments_still_build():
    with torch.device('meta'):
        assert zoo.create_model('spartan_tiny', num_classes=0, in_chans=1).num_classes == 0
        assert zoo.create_model('halonet_h0', num_classes=10, drop_path_rate=0.1).num_classes == 10
