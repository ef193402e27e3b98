"""ModelPort's engine: validation, conversion, tracking, images, runtimes and serving.

Nothing under this package imports Django; the portal adapts its rows to the
dataclasses defined here.
"""

__version__ = "0.1.0"
