"""Benchmark loaders (CounterFact ROME / flat format, ZsRE MEND format) and the bundled demo set."""
from metake_jax.data.loaders import (
    DEMO_PATH,
    FORMATS,
    DataUnavailableError,
    detect_format,
    load_cases,
    load_demo,
    load_hub,
    parse_records,
    select,
)

__all__ = [
    "DEMO_PATH", "FORMATS", "DataUnavailableError", "detect_format", "load_cases", "load_demo", "load_hub",
    "parse_records", "select",
]
