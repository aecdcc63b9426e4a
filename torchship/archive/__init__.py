"""`.mar` archives: built with torch-model-archiver (build.py), read and written by one reader (mar.py)."""
