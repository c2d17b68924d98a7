"""Train any zoo model from a recipe: `accelerate launch training/train.py --recipe training/recipes/<model>.yaml`.

    accelerate launch training/train.py --recipe training/recipes/spartan_tiny.yaml --data /data/imagenet
    accelerate launch --num_processes 8 training/train.py --recipe ... train.lr=2e-3   # KEY=VALUE overrides
    accelerate launch --config_file training/accelerate/fsdp.yaml training/train.py --recipe ...
    accelerate launch training/train.py --recipe ... --resume                           # continue the last run
    accelerate launch --quiet training/train.py ...   # an error as one line, without the launcher's traceback

The loop, the tasks and the checkpointing live in `zoo.train`; this file is only the command line.
"""
import argparse
import os
import sys
from pathlib import Path

import zoo
from zoo._io import check_output_dir
from zoo.train import trainer


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--recipe', required=True, type=Path, help='training/recipes/<model>.yaml')
    parser.add_argument('--data', help='dataset location, overriding the recipe (image folder, video file, frame folder)')
    parser.add_argument('--output-dir', type=Path, help='default: runs/<recipe name>')
    parser.add_argument('--resume', action='store_true',
                        help='continue from the newest complete checkpoint in --output-dir')
    parser.add_argument('--skip-damaged-checkpoints', action='store_true',
                        help='with --resume, pass over checkpoints whose files fail their manifest (else an error)')
    parser.add_argument('--exit-after-steps', type=int,
                        help='save a checkpoint and stop after this many optimizer steps (for time-limited slots)')
    parser.add_argument('--push-to-hub', metavar='REPO_ID', help='publish the trained Hub folder')
    parser.add_argument('overrides', nargs='*', metavar='KEY=VALUE', help='recipe overrides, e.g. train.epochs=10')
    args = parser.parse_args(argv)
    try:
        recipe = trainer.load_recipe(args.recipe, args.overrides)
        output_dir = check_output_dir(args.output_dir or Path('runs') / args.recipe.stem)
        trainer.train(recipe, output_dir, data=args.data, resume=args.resume,
                      exit_after_steps=args.exit_after_steps, push_to_hub=args.push_to_hub,
                      skip_damaged_checkpoints=args.skip_damaged_checkpoints)
    except zoo.ZooError as e:  # a recipe or setup error: one line; anything else keeps its traceback
        if os.environ.get('ZOO_DEBUG') == '1':
            raise
        print(f'train.py: {e}', file=sys.stderr)
        return getattr(e, 'exit_code', 2)
    return 0


if __name__ == '__main__':
    sys.exit(main())
