"""TrAct against plain training on real data: scikit-learn's digits, epochs to a set validation accuracy.

SpaRTAN-T (the registered spartan_tiny, narrowed to dims 16-32-64-64 with one block per stage so that it trains on a
CPU) learns the 1,797 8x8 digits, upsampled to 32x32 and repeated to RGB, 80/20 stratified split. Each seed trains
twice with the same initialisation and batch order: plain AdamW, and AdamW with TrAct (zoo.train.tract, lambda 0.1) on
the stem conv. Printed: epochs (and seconds) until the validation accuracy first reaches --target, per seed, then
the median and range, as markdown.

    python benchmarks/tract_digits.py --target 0.9 --max-epochs 30 --seeds 0 1 2
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import zoo
from zoo.train import tract

MODEL_ARGS = dict(dims=(16, 32, 64, 64), depths=(1, 1, 1, 1), num_classes=10)


def digits(size: int = 32):
    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0
    images = F.interpolate(images, size=(size, size), mode='bilinear', align_corners=False).repeat(1, 3, 1, 1)
    images = (images - images.mean()) / images.std()
    labels = torch.tensor(data.target)
    train, val = train_test_split(range(len(labels)), test_size=0.2, stratify=data.target, random_state=0)
    return images[train], labels[train], images[val], labels[val]


def run(seed, use_tract, data, target, max_epochs, lr, batch_size):
    x_train, y_train, x_val, y_val = data
    torch.manual_seed(seed)
    model = zoo.create_model('spartan_tiny', **MODEL_ARGS)
    hook = tract.attach(model, {'lambda': 0.1} if use_tract else None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for epoch in range(1, max_epochs + 1):
        model.train()
        order = torch.randperm(len(x_train), generator=generator)
        for batch in order.split(batch_size):
            loss = F.cross_entropy(model(x_train[batch]), y_train[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            accuracy = (model(x_val).argmax(1) == y_val).float().mean().item()
        if accuracy >= target:
            break
    if hook is not None:
        hook.remove()
    return (epoch if accuracy >= target else None), time.perf_counter() - start, accuracy


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--target', type=float, default=0.9)
    parser.add_argument('--max-epochs', type=int, default=30)
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    parser.add_argument('--lr', type=float, default=2e-3)
    parser.add_argument('--batch-size', type=int, default=64)
    parser.add_argument('--threads', type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = digits()
    results = {False: [], True: []}
    print(f'| seed | TrAct | epochs to {args.target:.0%} val acc | seconds | val acc then |')
    print('|---|---|---|---|---|')
    for seed in args.seeds:
        for use_tract in (False, True):
            epochs, seconds, accuracy = run(seed, use_tract, data, args.target, args.max_epochs, args.lr, args.batch_size)
            results[use_tract].append((epochs, seconds))
            shown = epochs if epochs is not None else f'not in {args.max_epochs}'
            print(f'| {seed} | {"on" if use_tract else "off"} | {shown} | {seconds:.1f} | {accuracy:.3f} |', flush=True)
    for use_tract, rows in results.items():
        reached = [e for e, _ in rows if e is not None]
        if reached:
            print(f'TrAct {"on" if use_tract else "off"}: epochs median {statistics.median(reached)}, range '
                  f'{min(reached)}-{max(reached)} ({len(reached)}/{len(rows)} seeds reached the target); seconds median '
                  f'{statistics.median(s for _, s in rows):.1f}')


if __name__ == '__main__':
    main()
