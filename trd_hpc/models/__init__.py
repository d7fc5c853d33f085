"""Building blocks that models share (``layers``: the Transformer encoder, fast dropout).
Each paper's model is in its folder: ``trd_hpc.tasks.emt.model``, ``trd_hpc.tasks.cnn3d.model``."""
