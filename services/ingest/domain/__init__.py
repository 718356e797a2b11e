"""Pure ingest rules: DICOM header checks, patient identity, object keys, statuses, assembly."""
