"""Launchers: run a config's sweep here (`local`), on a Cloud TPU VM (`tpu_vm`) or with XManager
(`xm_launch`). The sweep itself is data in the config file (see `sweep.py`)."""
