"""Model adapters: how a kind of model is prepared, what it predicts and which scalar is explained.

base.py: the interface the service uses. fixed_size.py: resize + normalise for fixed-input models.
classifier.py: class logits. semantic.py: per-class regions. instance.py: detections with masks.
"""
