"""Run configurations (ml_collections ``get_config()`` per file); see configs/base.py for every field."""
