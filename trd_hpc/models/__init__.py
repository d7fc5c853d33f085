"""Models: the EMT (paper 000, ``emt``) with its baselines (``baselines``), and
the dual-path 3-D CNN (paper 001, ``cnn3d``) with its losses (``losses``).
Import from the submodules."""
