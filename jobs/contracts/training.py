"""The training run's typed records and control channel, for the control plane (which reaches
workers only through jobs/): progress lines, summary.json, "checkpoint now" requests."""

from workers.contracts import RunMetrics, TrainSummary
from workers.control import CheckpointDone, CheckpointRequest, ControlChannel
from workers.progress import PREFIX, ProgressRecord

__all__ = ["PREFIX", "CheckpointDone", "CheckpointRequest", "ControlChannel", "ProgressRecord", "RunMetrics",
           "TrainSummary"]
