"""`dgan tune`: hyperparameter and loss-weight searches over Defect-GAN with Ray Tune.

space.py      the search spaces: the built-in ones (Eq. 11-12 loss weights, Sec. 4.1 learning
              rates) and the YAML format, validated against the GAN config before Ray starts
trainable.py  one trial: the trainer as a library call, reporting through its metrics callback
              with ray.tune.report, resuming Ray's checkpoints in its own run directory
study.py      a study: checks, local Ray or a cluster, ASHA / PBT / FIFO, Tuner.restore, the
              MLflow parent run, the ranked table, the best config as a GAN preset

Ray, Optuna and torch are imported inside the functions that need them, so that bad input is
refused in a second, before any of them loads.
"""
