"""The model folder (MAPS): one ``Maps`` object per group run, its split files and its weight files.

``folder`` holds ``Maps`` (layout + record + split + model loading), ``splits`` the verified split
records, ``weights`` the safetensors files (pickles refused). See docs/maps.md.
"""

from bids_app.maps.folder import Maps, MapsLayout, MapsRecord

__all__ = ["Maps", "MapsLayout", "MapsRecord"]
