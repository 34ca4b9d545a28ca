"""Evaluation of synthetic records: fidelity (and, to come, privacy, prompt faithfulness, plausibility)."""
