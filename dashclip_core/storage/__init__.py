"""Run-scoped atomic outputs (local folder or S3). Standard library only at import time."""

from dashclip_core.storage.run_paths import (
    SUCCESS,
    IncompletePublicationError,
    RunPaths,
    exists,
    is_s3,
    localize,
    manifest_of,
    parse_manifest,
    read_json,
    safe_run_id,
    verify_against_manifest,
    write_json,
)

__all__ = ["SUCCESS", "IncompletePublicationError", "RunPaths", "exists", "is_s3", "localize", "manifest_of", "parse_manifest",
           "read_json", "safe_run_id", "verify_against_manifest", "write_json"]
