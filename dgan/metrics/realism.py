"""A realism test that the generator never trained against: the classifier two-sample test.

Lopez-Paz and Oquab (ICLR 2017): a fresh classifier learns to tell set A from set B on one half of
each; its ROC-AUC on the other half says how far apart the sets are. 0.5: it cannot tell them
apart (the ideal for synthesized against real images); 1.0: it always can. The classifier's
held-out log loss is the test's second statistic: ln 2 (0.693) when it cannot tell, falling toward 0
as it tells the sets apart with more confidence. It keeps ranking generators that the AUC ties at
1.0, as early in training all of them are. Unlike D, or a fixed
inspector, this judge is trained from scratch at every test, so a generator cannot have learned to
fool it. Two halves of one real set give the floor a perfect generator would reach at that size.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

STEPS = 300  # Adam steps per test of up to PER_STEPS training images: about 10 s on 2 CPU cores
BATCH = 64
# A larger test trains for proportionally more steps, so that every test passes over its training
# images as often (32 times at STEPS and BATCH). With 300 steps at any size, 3000 real defects
# against the demo preset's defacements scored 0.728 (a classifier that had seen each training
# image 6 times), and 0.962 at 1500 steps and 0.964 at 3000.
PER_STEPS = 600


def scaled_steps(steps: int, train_images: int) -> int:
    """Adam steps of a test that trains on `train_images` images (both sets): `steps` up to
    PER_STEPS of them, and in proportion above, so that each is seen as often."""
    return max(steps, math.ceil(steps * train_images / PER_STEPS))


class TwoSampleCNN(nn.Module):
    """A small CNN for one bit (set B or set A), from scratch: three stride-2 convs, pooled."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(w, 2 * w, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(2 * w, 4 * w, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(4 * w, 4 * w, 4, 2, 1), nn.LeakyReLU(0.2),
        )  # fmt: skip
        self.head = nn.Linear(4 * w, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).mean(dim=(2, 3))).squeeze(1)


@dataclass
class TwoSampleResult:
    """Held-out ROC-AUC of telling B from A, overall and per group of B's items."""

    auc: float
    n: int  # items of each set used (half trained on, half tested)
    # Held-out mean binary cross-entropy: ln 2 at chance, 0 when told apart with certainty. It
    # passes ln 2 where the classifier overfits its half and is confidently wrong on the other
    # (2.35 was measured at an AUC of 0.68); read the AUC then.
    log_loss: float = float("nan")
    groups: dict[str, float] = field(default_factory=dict)
    group_n: dict[str, int] = field(default_factory=dict)
    # Over repeats of the test with other classifier seeds (repeated_test): the AUCs' sample
    # standard deviation, and how many tests the means above average. NaN for one test.
    auc_std: float = float("nan")
    repeats: int = 1


def _as_unit(images: Tensor) -> Tensor:
    """uint8 (N, 3, S, S) or [-1, 1] floats -> floats in [-1, 1]."""
    if images.dtype == torch.uint8:
        return images.float() / 127.5 - 1
    return images.float()


def _halves(n: int, groups: Sequence[str] | None, rng: np.random.Generator) -> np.ndarray:
    """A boolean mask of the test half, split within each group so every group is on both sides."""
    test = np.zeros(n, dtype=bool)
    keys = np.asarray(groups if groups is not None else ["all"] * n)
    odd = 0  # groups of odd size give their middle item to each side in turn
    for key in dict.fromkeys(keys.tolist()):
        members = rng.permutation(np.flatnonzero(keys == key))
        take = len(members) // 2 + (len(members) % 2) * odd
        odd ^= len(members) % 2
        test[members[:take]] = True
    return test


def two_sample_test(
    a: Tensor,
    b: Tensor,
    seed: int = 0,
    groups: Sequence[str] | None = None,
    steps: int = STEPS,
    batch_size: int = BATCH,
) -> TwoSampleResult:
    """Classifier two-sample test of sets `a` (label 0) and `b` (label 1), paired by index.

    `a` and `b` hold the same number of images (uint8 or [-1, 1]); item i of both is on the same
    side of the split, and `groups[i]` (a label set, say) names a group whose AUC is also
    reported, on the held-out items of that group. The classifier trains for `steps` Adam steps
    of `batch_size`, more when it trains on over PER_STEPS images (scaled_steps). Deterministic
    for a seed.
    """
    from torchmetrics.functional.classification import binary_auroc

    n = min(len(a), len(b))
    if n < 4:
        raise ValueError(f"a two-sample test needs at least 4 images per set, got {n}")
    a, b = _as_unit(a[:n]), _as_unit(b[:n])
    groups = list(groups[:n]) if groups is not None else None
    rng = np.random.default_rng([seed, 7])
    test = torch.from_numpy(_halves(n, groups, rng))
    x_train = torch.cat([a[~test], b[~test]])
    y_train = torch.cat([torch.zeros(int((~test).sum())), torch.ones(int((~test).sum()))])
    steps = scaled_steps(steps, len(x_train))

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TwoSampleCNN()
        opt = torch.optim.Adam(model.parameters(), lr=2e-3, betas=(0.5, 0.999))
        order = torch.randperm(len(x_train))
        for step in range(steps):
            start = (step * batch_size) % len(x_train)
            if start + batch_size > len(x_train):
                order = torch.randperm(len(x_train))
                start = 0
            idx = order[start : start + batch_size]
            loss = F.binary_cross_entropy_with_logits(model(x_train[idx]), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            score_a = torch.cat([model(x) for x in a[test].split(256)])
            score_b = torch.cat([model(x) for x in b[test].split(256)])

    def auc(mask_a: Tensor, mask_b: Tensor) -> float:
        scores = torch.cat([score_a[mask_a], score_b[mask_b]])
        target = torch.cat([torch.zeros(int(mask_a.sum())), torch.ones(int(mask_b.sum()))])
        return float(binary_auroc(scores, target.long()))

    held_out = int(test.sum())
    everything = torch.ones(held_out, dtype=torch.bool)
    scores = torch.cat([score_a, score_b])
    target = torch.cat([torch.zeros(len(score_a)), torch.ones(len(score_b))])
    log_loss = float(F.binary_cross_entropy_with_logits(scores, target))
    result = TwoSampleResult(auc(everything, everything), n, log_loss=log_loss)
    if groups is not None:
        held_groups = np.asarray(groups)[test.numpy()]
        for key in dict.fromkeys(held_groups.tolist()):
            mask = torch.from_numpy(held_groups == key)
            if mask.sum() >= 2:
                result.groups[key] = auc(mask, mask)
                result.group_n[key] = int(mask.sum())
    return result


def halves_test(images: Tensor, seed: int = 0, **kwargs) -> TwoSampleResult:
    """The floor: the same test between two random halves of one real set."""
    order = torch.from_numpy(np.random.default_rng([seed, 8]).permutation(len(images)))
    half = len(images) // 2
    return two_sample_test(images[order[:half]], images[order[half : 2 * half]], seed, **kwargs)


def repeat_seed(seed: int, repeat: int) -> int:
    """The seed of repeat `repeat` of a test at `seed`: repeat 0 is the test at `seed` itself."""
    return seed + 1_000_003 * repeat


def repeated_test(
    test: Callable[[int], TwoSampleResult], seed: int, repeats: int
) -> TwoSampleResult:
    """`test(seed)` at `repeats` classifier seeds (each its own halves and initial weights),
    averaged: the AUC, log loss and group AUCs are the means, `auc_std` the AUCs' spread. It
    separates the test's own variance from the generator's; one repeat is the test itself."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    results = [test(repeat_seed(seed, r)) for r in range(repeats)]
    if repeats == 1:
        return results[0]
    aucs = np.array([r.auc for r in results])
    groups = {k: [r.groups[k] for r in results if k in r.groups] for k in results[0].groups}
    return TwoSampleResult(
        float(aucs.mean()),
        results[0].n,
        log_loss=float(np.mean([r.log_loss for r in results])),
        groups={k: float(np.mean(v)) for k, v in groups.items()},
        group_n=dict(results[0].group_n),
        auc_std=float(aucs.std(ddof=1)),
        repeats=repeats,
    )


# What each view of an image keeps, for realism_by_cue: the test on a view that drops a cue
# (colour, detail finer than 4 px) falls toward 0.5 as far as the fakes were told apart by it.
CUES = ("colour", "grey", "blur", "grey+blur")
BLUR = 4  # px: the blurred view averages 4 x 4 blocks and resizes back bilinearly


def grey_view(images: Tensor) -> Tensor:
    """Each pixel's mean over the channels, in all three: the image without its colour."""
    x = _as_unit(images)
    return x.mean(dim=1, keepdim=True).expand_as(x).contiguous()


def blur_view(images: Tensor, factor: int = BLUR) -> Tensor:
    """The image without detail finer than `factor` pixels (block mean, resized back)."""
    x = _as_unit(images)
    small = F.avg_pool2d(x, factor, ceil_mode=True)
    return F.interpolate(small, size=x.shape[2:], mode="bilinear", align_corners=False)


VIEWS = {
    "colour": _as_unit,
    "grey": grey_view,
    "blur": blur_view,
    "grey+blur": lambda x: blur_view(grey_view(x)),
}


def realism_by_cue(
    a: Tensor,
    b: Tensor,
    seed: int = 0,
    cues: Sequence[str] = CUES,
    groups: Sequence[str] | None = None,
    steps: int = STEPS,
) -> dict[str, TwoSampleResult]:
    """The two-sample test of `a` against `b` on each view in `cues` (see VIEWS): where the
    AUC of the full images ("colour") falls on the grey view, the colour told the sets apart;
    where it falls on the blurred view, detail finer than BLUR pixels did (edges, fringes,
    stripes). Same halves and classifier seed on every view."""
    unknown = [c for c in cues if c not in VIEWS]
    if unknown:
        raise ValueError(f"unknown cue {unknown[0]!r}; the cues are {', '.join(VIEWS)}")
    return {
        cue: two_sample_test(VIEWS[cue](a), VIEWS[cue](b), seed, groups=groups, steps=steps)
        for cue in cues
    }
