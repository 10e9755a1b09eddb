"""Evaluating a trained generator: FID/KID under honest names, and synthesis quality.

One procedure serves `dgan eval fid`, `dgan eval synth` and the periodic evaluation inside
`dgan train gan`. A fixed eval set (`inputs`: normals, asked labels drawn from the dataset's label
distribution, random boxes, noise seeds) is defaced by G, each process taking one shard
(`measure`). The per-image figures of `dgan.metrics.synthesis`, the features of each extractor and
the inspector's calls (`judges`) are gathered over processes and reduced to metrics; the distances
of `dgan.metrics.fid` compare the synthesized features with cached statistics of real defects.

    inputs.py        EvalSet and how it is drawn
    judges.py        the extractors and the inspector that score images
    measure.py       sharded defacement, gathering, reference statistics, reduction to metrics
    fid_report.py    `dgan eval fid`
    synth_report.py  `dgan eval synth`
    periodic.py      the evaluation that training runs every log.eval_every iterations

Metric names carry the extractor: `fid`/`kid` only on the standard Inception features,
`fid_inspector`/`kid_inspector` on a frozen inspector's (see dgan.metrics.registry). Figures on the
held-out surface family (split "transfer") carry the suffix `_transfer`.
"""
