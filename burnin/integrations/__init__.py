"""burnin for training loops that a framework runs: each integration maps the framework's hooks onto
the callback form of the rank API (`burnin.rank.Session.start`, `begin_step`, `end_step`, `finish`).

- `burnin.integrations.lightning`: `BurninCallback`, for a PyTorch Lightning `Trainer`
  (`pip install 'burnin[lightning]'`).

Importing this package imports no framework.
"""

__all__: list[str] = []
