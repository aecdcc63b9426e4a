"""`make bench`: every format in-process and both engines over HTTP, measured side by side in one run."""
