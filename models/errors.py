"""Errors raised by the model package (no imports: the lowest layer of ``models/``)."""
from __future__ import annotations


class ConversionError(ValueError):
    """A checkpoint or model spec cannot be read / converted / exported.

    The message names the file, tensor, architecture or model id at fault.
    """
