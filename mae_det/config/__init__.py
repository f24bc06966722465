"""yacs configs: pretraining (pretrain.py), detection (detection.py), classification (classification.py)."""
