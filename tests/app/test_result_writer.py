"""The infer task writes NIfTI results with nibabel (MONAI Label's ITK writer takes seconds on first use)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from lib.infers.medsegx import _write_nifti


@pytest.mark.parametrize("extension, dtype, order", [(".nii.gz", None, "C"), (".nii", "uint16", "C"),
                                                    (".nii.gz", None, "F"), (".nii", "uint16", "F")])
def test_nifti_result_keeps_the_image_grid(tmp_path, extension, dtype, order):
    """The infer task builds a NIfTI result in Fortran order (NIfTI's on-disk order): the same file either way."""
    affine = np.array([[-0.8, 0.0, 0.0, 10.0], [0.0, 0.8, 0.0, -20.0], [0.0, 0.0, 2.5, 5.0], [0.0, 0.0, 0.0, 1.0]])
    label = np.zeros((160, 160, 24), dtype=np.uint8, order=order)
    label[40:90, 50:100, 3:20] = 2
    label[45, 60, 7] = 1
    data = {"pred": MetaTensor(label, affine=torch.tensor(affine)), "image_path": str(tmp_path / "image.nii.gz"),
            "image": MetaTensor(np.zeros(label.shape, np.float32), affine=torch.tensor(affine)), "result": {"label": "liver"}}
    path, result = _write_nifti(data, extension, dtype)
    written = nib.load(path)
    assert path.endswith(extension) and result == {"label": "liver"}
    assert written.shape == label.shape and np.allclose(written.affine, affine, atol=1e-6)
    assert int(written.header["qform_code"]) == 1 and int(written.header["sform_code"]) == 1
    assert written.get_data_dtype() == np.dtype(dtype or np.uint8)
    assert np.array_equal(np.asarray(written.dataobj), label)
