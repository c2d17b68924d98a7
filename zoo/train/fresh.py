"""FreSh for the index-driven video representations: choose the positional encoding by spectrum matching.

"FreSh: Frequency Shifting for Accelerated Neural Representation Learning" (Kania et al., ICLR 2025) picks an
embedding hyperparameter without training: it compares the spectrum of the untrained model's output with the
target's and keeps the candidate whose spectrum is closest in the Wasserstein distance.

NeRV, NeRV++ and HNeRV in NeRV mode (`pe=...`) embed one coordinate, t = index / num_frames, as
[sin(b^k pi t), cos(b^k pi t)] for k < levels, so the encoding sets how fast their output can change along t. The
spectrum compared here is therefore the temporal one: the magnitude of the DFT along the frames, averaged over
pixels and channels, without the constant term, normalised to sum to 1, for the target video and for the untrained
model's output (averaged over a few initialisations). HNeRV's default form takes its embeddings from a frame encoder,
with no positional encoding: FreSh does not apply to it.
"""
from typing import Any, Dict, List, Sequence, Tuple

import torch

import zoo

BASES = (1.05, 1.1, 1.25, 1.5, 2.0)
LEVELS = (8, 16, 32, 40, 64, 80)


def temporal_spectrum(frames: torch.Tensor) -> torch.Tensor:
    """(T, C, H, W) -> the normalised amplitude spectrum along T, frequencies 1 .. T // 2."""
    amplitude = torch.fft.rfft(frames.double() - frames.double().mean(0), dim=0).abs()
    spectrum = amplitude.flatten(1).mean(1)[1:]
    return spectrum / spectrum.sum().clamp_min(1e-12)


def wasserstein(p: torch.Tensor, q: torch.Tensor) -> float:
    """Wasserstein-1 distance between two distributions on the same evenly spaced support (in bins)."""
    return (p.cumsum(0) - q.cumsum(0)).abs().sum().item()


def _encoding_args(model_name: str, model_args: Dict[str, Any], base: float, levels: int) -> Dict[str, Any]:
    if 'pe' in model_args:  # HNeRV in NeRV mode
        return {**model_args, 'pe': (base, levels)}
    return {**model_args, 'pe_base': base, 'pe_levels': levels}


def applies(model_name: str, model_args: Dict[str, Any]) -> bool:
    """Whether the model embeds the frame index with a positional encoding FreSh can tune."""
    return not model_name.startswith('hnerv') or model_args.get('pe') is not None


@torch.no_grad()
def choose_encoding(model_name: str, model_args: Dict[str, Any], frames: torch.Tensor,
                    bases: Sequence[float] = BASES, levels: Sequence[int] = LEVELS,
                    seeds: Sequence[int] = (0, 1, 2)) -> Tuple[Dict[str, Any], List[Dict[str, float]]]:
    """The model arguments with the encoding whose untrained output spectrum is nearest the video's, and the
    distance of every candidate (`base`, `levels`, `distance`)."""
    if not applies(model_name, model_args):
        raise ValueError(f'FreSh tunes a positional encoding of the frame index; {model_name} embeds frames with an '
                         'encoder instead (set model_args.pe for its NeRV mode)')
    target = temporal_spectrum(frames)
    index = torch.arange(len(frames))
    table = []
    with torch.random.fork_rng():  # the caller's random stream (the real model's initialisation) stays as it was
        for base, level in [(b, n) for b in bases for n in levels]:
            args = _encoding_args(model_name, model_args, base, level)
            spectra = []
            for seed in seeds:
                torch.manual_seed(seed)
                model = zoo.create_model(model_name, **args).eval()
                output = torch.cat([model(index=chunk) for chunk in index.split(8)])
                spectra.append(temporal_spectrum(output))
            table.append({'base': base, 'levels': level,
                          'distance': wasserstein(torch.stack(spectra).mean(0), target)})
    best = min(table, key=lambda row: row['distance'])
    return _encoding_args(model_name, model_args, best['base'], best['levels']), table
