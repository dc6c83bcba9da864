"""The one synthetic-data generator (tests, demo, container checks): cohorts, anatomy, a simulated scanner.

``dataset.generate_dataset`` writes a raw BIDS dataset (and optionally template-space derivatives) from
nilearn's MNI152 template: ``cohorts`` decides who is in it, ``anatomy`` each subject's brain in template space,
``acquisition`` what a scanner makes of it. ``bids_app-generate`` (``cli.generate``) is its command line.
"""

from bids_app.synthetic.dataset import GeneratedDataset, generate_dataset

__all__ = ["GeneratedDataset", "generate_dataset"]
