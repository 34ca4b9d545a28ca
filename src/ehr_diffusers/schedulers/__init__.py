"""Noise schedulers (``SchedulerMixin``, ``ConfigMixin``)."""

from .scheduling_logsnr_cosine import LogSNRCosineScheduler, LogSNRCosineSchedulerOutput

__all__ = ["LogSNRCosineScheduler", "LogSNRCosineSchedulerOutput"]
