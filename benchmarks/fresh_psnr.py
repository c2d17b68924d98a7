"""FreSh against the recipe's positional encoding: PSNR after a fixed short fit, NeRV and NeRV++.

For each clip and model, the recipe's encoding (NeRV / NeRV++ Bunny recipes: base 1.25, 40 levels) and the one
FreSh chooses (zoo.train.fresh.choose_encoding) are fitted with the same seed, optimiser and number of steps, and
the per-frame-mean PSNR of the whole clip is printed as a markdown table. Clips are made from scikit-image photos
(zoo.train.video_fitting.make_demo_clip): `astronaut` as the README demo (hnerv_demo.yaml), and a second scene.

    python benchmarks/fresh_psnr.py --steps 300 --threads 1 [--clips astronaut coffee]
"""
import argparse
import time

import torch

import zoo
from zoo.train import fresh
from zoo.tasks.video import fitting_loss, psnr
from zoo.train.video_fitting import make_demo_clip

CLIPS = {
    'astronaut': dict(image='astronaut', num_frames=16, pan=0.3, zoom=0.15),
    'coffee': dict(image='coffee', num_frames=16, pan=1.0, zoom=0.3),
}
# The Bunny recipes' decoders, narrowed for 96x192 frames on a CPU (strides 3,2,2,2,2 reach 96x192 from 2x4).
MODELS = {
    'nerv_s': dict(strides=(3, 2, 2, 2, 2), pe_base=1.25, pe_levels=40, stem_dim=256, lower_width=32,
                   expansion=1.0, reduction=2, act_layer='silu'),
    'nervpp_xs': dict(strides=(3, 2, 2, 2, 2), pe_base=1.25, pe_levels=40, stem_dim=256, lower_width=32,
                      expansion=1.0, reduction=2, act_layer='silu'),
}


def fit(name, args, frames, steps, lr, seed=0):
    torch.manual_seed(seed)
    model = zoo.create_model(name, **args).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.5, 0.999))
    loss_fn = fitting_loss('fusion6')
    generator = torch.Generator().manual_seed(seed)
    for step in range(steps):
        index = torch.randint(len(frames), (2,), generator=generator)
        loss = loss_fn(model(index=index), frames[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        out = torch.cat([model(index=i) for i in torch.arange(len(frames)).split(8)])
    return psnr(out, frames).mean().item()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--steps', type=int, default=400)
    parser.add_argument('--lr', type=float, default=2e-3)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--clips', nargs='+', default=list(CLIPS), choices=list(CLIPS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print('| clip | model | encoding | base | levels | spectrum distance | PSNR (dB) |')
    print('|---|---|---|---|---|---|---|')
    for clip in args.clips:
        frames = make_demo_clip(frame_size=(96, 192), **CLIPS[clip])
        for name, model_args in MODELS.items():
            model_args = {**model_args, 'frame_size': (96, 192), 'num_frames': len(frames)}
            start = time.perf_counter()
            chosen, table = fresh.choose_encoding(name, model_args, frames)
            search_s = time.perf_counter() - start
            distance = {(row['base'], row['levels']): row['distance'] for row in table}
            for label, run_args in (('recipe', model_args), ('FreSh', chosen)):
                key = (run_args['pe_base'], run_args['pe_levels'])
                value = fit(name, run_args, frames, args.steps, args.lr)
                print(f'| {clip} | {name} | {label} | {key[0]} | {key[1]} | {distance[key]:.4f} | {value:.2f} |',
                      flush=True)
            print(f'<!-- {clip} {name}: FreSh search over {len(table)} candidates took {search_s:.0f} s -->', flush=True)


if __name__ == '__main__':
    main()
