"""Make the app's own ``lib`` package importable, as MONAI Label's app loader does."""

import sys
from pathlib import Path

APP_DIR = Path(__file__).resolve().parents[2] / "apps" / "medsegx"
if str(APP_DIR) not in sys.path:
    sys.path.insert(0, str(APP_DIR))
