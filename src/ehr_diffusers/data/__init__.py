"""MIMIC-IV data layer: reader, ICD mapping, vector schema, cohort build and the synthetic demo cohort."""
