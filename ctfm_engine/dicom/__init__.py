"""DICOM: series selection and reading (compressed syntaxes, tilt, missing UIDs), DICOM-SEG and SR writing on
highdicom, validation with dciodvfy, and PACS clients (DICOMweb, DIMSE) with an outbox."""
