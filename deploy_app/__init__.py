"""CT-FM as a MONAI Deploy application (monai-deploy-app-sdk 4.0): DICOM CT in, DICOM-SEG and SR out."""
