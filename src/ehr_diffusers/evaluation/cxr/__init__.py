"""Evaluation of predicted chest X-rays: FID and KID of the predicted images against the real next images,
preservation of the findings the events imply, and the controls every figure is compared with (the previous image
as the prediction, and the events shuffled between triplets)."""
