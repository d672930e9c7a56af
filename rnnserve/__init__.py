"""rnnserve: train, export and serve stateful recurrent models (LSTM, GRU).

The distribution maps the repository's top-level folders under this package:
``rnnserve.training`` (training/), ``rnnserve.export`` (export/), and later
``rnnserve.server``, ``rnnserve.client`` and ``rnnserve.protos``. Importing this
package, or any torch-free module below it, never imports torch.
"""

from __future__ import annotations

__version__ = "0.1.0"
