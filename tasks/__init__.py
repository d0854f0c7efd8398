"""Thin Airflow task functions; each calls dashclip_core and returns small metadata (URIs, counts, metrics)."""
