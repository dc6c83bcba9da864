"""``python -m bids_app`` runs the BIDS-App command line."""

from bids_app.cli.main import main

raise SystemExit(main())
