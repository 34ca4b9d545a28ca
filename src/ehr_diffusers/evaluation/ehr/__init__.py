"""Evaluation of synthetic EHR records against a held-out real split: fidelity, utility (dimension-wise prediction),
privacy (membership and attribute inference, distance to closest record; Yan et al. 2022), prompt faithfulness,
clinical plausibility, the baselines every figure is compared with, and the suite that scores one run."""
