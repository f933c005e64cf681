"""The app's own package: settings, secrets, auth, the Dataverse client and the intake rules.

Nothing here does I/O or imports a heavy SDK at import time: the Functions host imports
`function_app` on every cold start, and indexing must succeed even with settings missing.
"""

__version__ = "0.1.0"
