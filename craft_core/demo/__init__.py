"""The offline demo: tiny real policies, scripted simulator datasets and the assets stage.

Nothing outside this package (and the per-policy ``tiny.py`` builders it loads) imports it: the
pipeline reaches it only through the ``assets`` stage, and ``craft_core.policy_io`` loads tiny
folders through the ``craft.policy_folders`` plugin ``craft_core.demo.tiny.loading.TINY_FOLDERS``.
"""
