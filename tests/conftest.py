import os
import sys

# tests import the flat modules (model.py, data.py, ...) from the repository root
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
