"""Offline demo: a small multi-domain corpus built from the Python install plus generated text."""
