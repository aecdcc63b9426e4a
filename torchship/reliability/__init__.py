"""`make reliability`: hostile corpus and fuzz (corpus.py), checked load and faults (traffic.py), the whole run
(run.py). Nothing that runs in a server imports it."""
