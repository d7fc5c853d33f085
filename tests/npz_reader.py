"""A test-only image format: one NumPy ``.npz`` per subject holding ``data`` and ``affine``.

It registers with ``trd_hpc.ingest.readers`` when imported ($TRD_HPC_PLUGINS=tests.npz_reader),
as a reader of a format of your own would: trd_hpc/ names it nowhere."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from trd_hpc.errors import IngestError
from trd_hpc.ingest.images import grid_image, header_of
from trd_hpc.ingest.readers import register_reader


class NpzReader:
    describe = "NumPy .npz (data, affine) as a nibabel image, then the nifti reader's steps"

    def _image(self, path: Path, subject: str):
        if not Path(path).is_file():
            raise IngestError(f"subject {subject}: {path}: image file not found")
        with np.load(path) as z:
            return nib.Nifti1Image(np.asarray(z["data"], dtype=np.float32), np.asarray(z["affine"]))

    def header(self, path, subject, ndim, min_frames=None):
        return header_of(self._image(path, subject), path, subject, ndim, min_frames)

    def to_grid(self, path, subject, grid, frames=None, temporal="crop", normalize=False):
        return grid_image(self._image(path, subject), path, subject, grid, frames, temporal, normalize)


register_reader("image", "npz", NpzReader())
