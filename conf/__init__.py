"""The Hydra configuration of the gal-* commands (YAML groups; the schemas are pretrain/config.py and
pretrain/data/config.py). A package so that a non-editable install carries it beside ``pretrain``."""
