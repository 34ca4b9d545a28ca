"""MIMIC-IV patient records: ICD mapping, the vector schema, the cohort build, reading prepared datasets, the
synthetic demo cohort and records written back as MIMIC-IV-shaped tables."""
