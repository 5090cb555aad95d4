"""Job manifests (schema, validation, expansion) and result tables; no Ray, no torch."""
from __future__ import annotations

from .manifest import (
    Job, LoraRef, Manifest, ManifestError, job_content_id, load_manifest, routing_key_of, validate_manifest,
)
from .options import FarmOptions
from .results import (
    ResultRow, ResultsWriter, completed_jobs, image_uri, read_results, read_results_table,
)

__all__ = [
    "Job", "LoraRef", "Manifest", "ManifestError", "routing_key_of", "job_content_id", "load_manifest",
    "validate_manifest", "FarmOptions", "ResultRow", "ResultsWriter", "completed_jobs", "image_uri", "read_results",
    "read_results_table",
]
