"""``python -m trd_hpc.cli ...`` (what torchrun and srun launch): the same as ``trd-hpc ...``."""

import sys

from trd_hpc.cli import main

sys.exit(main())
