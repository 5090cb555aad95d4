"""The farm service: a farm that stays up (``farm up`` / ``submit`` / ``status`` / ``down``).

``config.py`` reads FARM.yaml (the pools, the state root, the submitters' weights) and
``state.py`` keeps the run records under the state root, so runs survive restarts.
Neither starts Ray; the controller does.
"""
