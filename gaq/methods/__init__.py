"""Quantization methods; each is a small file on top of the shared machinery.

Look methods up through :mod:`gaq.registry` rather than importing them here, so that
importing this package stays cheap (no torch).
"""
