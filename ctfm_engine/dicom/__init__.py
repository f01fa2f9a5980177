"""DICOM input: reading one CT series; DICOM-SEG/SR writing and PACS arrive with the MONAI Deploy issue."""
