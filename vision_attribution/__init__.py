"""vision-attribution: segmentation masks and gradient attributions (IG, path gradients, IDG) served by TorchServe.

Requests flow one way: decode (decode.py, formats/) -> model adapter (adapters/) -> attribution engine
(engine.py) -> encode (encode.py). archives/ names what each TorchServe archive serves; networks/ holds the
architectures; service.py runs a batch. Nothing here imports TorchServe.
"""
