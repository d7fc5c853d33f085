"""Paper 001: a dual-path 3-D CNN predicts medication response (3 classes, focal loss) and
severity (regression) from 3-D volumes.

    config.py     the config classes (cohort, ingest spec, model, loss, experiment)
    cohort.py     the synthetic volumes (section 2.1)     ingested.py  the ingested ones
    model.py      the dual-path CNN and its baselines     losses.py    focal + multi-task loss
    spec.py       the task: inputs, loss, records, metrics, baselines, predict columns
    evaluate.py   confusion matrix, severity scatter, the report's parts
    configs/      cnn3d.yaml (paper scale), cnn3d_tiny.yaml, cnn3d_contiguous.yaml
    sweeps/       cnn3d_grid.yaml (the paper's grid), cnn3d_asha.yaml

Nothing is imported here: each module is loaded when it is named.
"""
