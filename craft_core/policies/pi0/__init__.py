"""The pi0 policy type: its adapter (``adapter.py``) and its tiny offline builder (``tiny.py``)."""
