"""Job manifests (schema, validation, expansion) and result tables; no Ray, no torch."""
from __future__ import annotations

from .manifest import (
    Job, LoraRef, Manifest, ManifestError, composition_of, content_id, load_manifest, validate_manifest,
)
from .results import (
    ResultRow, ResultsWriter, completed_jobs, image_uri, read_results, read_results_table, write_image_atomic,
)

__all__ = [
    "Job", "LoraRef", "Manifest", "ManifestError", "composition_of", "content_id", "load_manifest",
    "validate_manifest", "ResultRow", "ResultsWriter", "completed_jobs", "image_uri", "read_results",
    "read_results_table", "write_image_atomic",
]
