"""Run-scoped atomic outputs (local folder or S3). Standard library only at import time."""

from dashclip_core.storage.run_paths import (
    SUCCESS,
    RunPaths,
    exists,
    is_s3,
    localize,
    read_json,
    safe_run_id,
    write_json,
)

__all__ = ["SUCCESS", "RunPaths", "exists", "is_s3", "localize", "read_json", "safe_run_id", "write_json"]
