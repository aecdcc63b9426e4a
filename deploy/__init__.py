"""Archiving, serving, verification and deployment stages."""
