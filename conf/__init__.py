"""bnn-harness's Hydra config tree, installed as the package harness.conf (see setup.py)."""
