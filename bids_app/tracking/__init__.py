"""Optional experiment tracking of the group level: a no-op ``Tracker`` or a local MLflow store (``mlflow``).

The model folder stays the record; a tracker only mirrors it. Training and prediction receive the tracker
that ``levels`` opened and call its hooks.
"""

from bids_app.tracking.mlflow import Tracker, open_tracker

__all__ = ["Tracker", "open_tracker"]
