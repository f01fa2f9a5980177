"""DICOM input: assemble one CT series from a folder of DICOM files into a CTVolume."""
