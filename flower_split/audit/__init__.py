"""The leakage audit: record the cloud's view of a run and attack it (DESIGN.md section 7).

* :mod:`~flower_split.audit.transcript` - the recorder and the transcript files;
* :mod:`~flower_split.audit.taps` - feed the recorder from a cloud party, plain or secure;
* :mod:`~flower_split.audit.inversion` - token recovery from ``f``;
* :mod:`~flower_split.audit.labels` - label inference from ``dL/dh`` and ``z``;
* :mod:`~flower_split.audit.report` and :mod:`~flower_split.audit.runner` - score every
  attack and write ``audit.json``.
"""

from flower_split.audit.report import AuditOptions, run_audit
from flower_split.audit.runner import AUDIT_FILE, audit_directory
from flower_split.audit.taps import tap_cloud
from flower_split.audit.transcript import (
    CloudViewRecorder, GroundTruth, StepView, Transcript, TranscriptError, load_transcript, save_transcript,
)

__all__ = ["AUDIT_FILE", "AuditOptions", "CloudViewRecorder", "GroundTruth", "StepView", "Transcript",
           "TranscriptError", "audit_directory", "load_transcript", "run_audit", "save_transcript", "tap_cloud"]
