"""Coverage-guided fuzzing of every decoder that takes bytes from the network or files.

``python -m fuzz [-n N] TARGET...`` (``pip install -e .[fuzz]``); see ``fuzz/__main__.py``.
"""
