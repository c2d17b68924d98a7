"""Write scikit-learn's handwritten digits as an image folder that the classification recipes read.

    python training/digits.py data/digits
    accelerate launch training/train.py --recipe training/recipes/spartan_tiny_digits.yaml --data data/digits

`sklearn.datasets.load_digits` holds 1,797 real 8x8 grey scans (16 levels) of digits written by 43 people (the
test part of UCI's Optical Recognition of Handwritten Digits). The split is scikit-learn's
`train_test_split(test_size=450, stratify=labels, random_state=0)`: 1,347 training and 450 test images, every
class in both in proportion. Images are written at their own 8x8 size, grey levels scaled to 0-255, as
`train/<digit>/<index>.png` and `validation/<digit>/<index>.png`; the recipe's transforms upsample them.
"""
import argparse
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

TEST_SIZE, SEED = 450, 0


def write_digits(root: Path) -> Path:
    """Write the split under `root` (left as it is when already complete) and return `root`."""
    digits = load_digits()
    indices = np.arange(len(digits.target))
    train, test = train_test_split(indices, test_size=TEST_SIZE, stratify=digits.target, random_state=SEED)
    for split, chosen in (('train', train), ('validation', test)):
        for index in chosen:
            path = root / split / str(digits.target[index]) / f'{index:04d}.png'
            if not path.is_file():
                path.parent.mkdir(parents=True, exist_ok=True)
                pixels = np.round(digits.images[index] * (255 / 16)).astype(np.uint8)
                Image.fromarray(pixels).save(path)
    return root


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('root', type=Path, help='folder to write train/ and validation/ into')
    args = parser.parse_args(argv)
    write_digits(args.root)
    print(f'wrote {len(load_digits().target)} digits to {args.root}/train and {args.root}/validation')


if __name__ == '__main__':
    main()
