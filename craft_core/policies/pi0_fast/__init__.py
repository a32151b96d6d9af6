"""The pi0_fast policy type: its adapter (``adapter.py``) and its tiny offline builder (``tiny.py``)."""
