"""Storage and network I/O: media fetch under limits, the results store, the SSRF guard.

The bottom layer of worker/: it imports none of the other wings (import-linter contract).
"""
