"""dnn-tricks: every classic DNN training trick as one switch in a Lightning config."""

import os

# albumentations checks PyPI for updates at import; this project never touches the network.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

__version__ = "0.1.0"
