"""Paper 000: the Enhanced Multimodal Transformer predicts treatment-resistant depression
from 4-D fMRI patches, SNPs and clinical variables.

    config.py     the config classes (cohort, ingest spec, model, experiment)
    cohort.py     the synthetic cohort (section 2.1)      ingested.py  the ingested one
    model.py      the EMT (section 2.2)                   baselines.py late-fusion MLP, random forest
    spec.py       the task: inputs, loss, records, metrics, baselines, predict columns
    evaluate.py   calibration, importance, figures, the report's parts
    configs/      emt.yaml (paper scale), emt_tiny.yaml   sweeps/  emt_asha.yaml

Nothing is imported here: each module is loaded when it is named.
"""
