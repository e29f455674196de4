"""Datasets: the record/dataset contract, file readers, synthetic phantoms, splits and adapters."""
from medprobe.data.base import SPLITS, ArrayDataset, ImageDataset, Record, SubsetDataset, TaskSpec
from medprobe.data.readers import (nifti_affine, read_dicom, read_dicom_series, read_image, read_mask,
                                   read_nifti)
from medprobe.data.splits import check_no_leakage, patient_split, resplit
from medprobe.data.phantom import (make_chest_phantoms, make_volume_phantoms, volume_metadata, write_dicom,
                                   write_phantom_files)
from medprobe.data.adapters import AdapterInfo, build_dataset, get_adapter, list_adapters, register_adapter

__all__ = [
    "SPLITS", "ArrayDataset", "ImageDataset", "Record", "SubsetDataset", "TaskSpec",
    "nifti_affine", "read_dicom", "read_dicom_series", "read_image", "read_mask", "read_nifti",
    "check_no_leakage", "patient_split", "resplit",
    "make_chest_phantoms", "make_volume_phantoms", "volume_metadata", "write_dicom", "write_phantom_files",
    "AdapterInfo", "build_dataset", "get_adapter", "list_adapters", "register_adapter",
]
