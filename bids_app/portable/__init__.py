"""Portable models: one file that carries a trained model, its card and its leak guard to another site.

``bids_app-model export`` writes it (``model.export_model``), ``bids_app-model import`` and the group level's
``--model`` verify and unpack it (``model.import_archive``, ``model.open_model``), ``bids_app-model info``
prints its card without unpacking (``archive.read_card``). A shared package: the command line and the group
level open models with it, and the prediction stage checks a new site's images against the guard it carries
(``guard.TravellingGuard``). See docs/portable.md.
"""

from bids_app.portable.archive import FORMAT_VERSION, read_archive, read_card
from bids_app.portable.guard import Fingerprints, TravellingGuard
from bids_app.portable.model import ImportedModel, export_model, import_archive, open_imported, open_model

__all__ = [
    "FORMAT_VERSION",
    "Fingerprints",
    "ImportedModel",
    "TravellingGuard",
    "export_model",
    "import_archive",
    "open_imported",
    "open_model",
    "read_archive",
    "read_card",
]
