"""Sub-commands of `cnnlstm-ext`, one module each (see cnnlstm_ext/cli.py)."""
