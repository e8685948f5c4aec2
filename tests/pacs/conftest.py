"""PACS-test setup: the app's own ``lib`` importable as MONAI Label's loader makes it (as in ``tests/app``)."""

import sys
from pathlib import Path

APP_DIR = Path(__file__).resolve().parents[2] / "apps" / "medsegx"
if str(APP_DIR) not in sys.path:
    sys.path.insert(0, str(APP_DIR))
