"""vision-attribution: segmentation masks and gradient attributions (IG, path gradients, IDG) served by TorchServe.

Requests flow one way: decode (formats/) -> model adapter (adapters/, over networks/) -> attribution engine
(attribution/) -> encode (formats/). The wings, each importing only the ones before it:

  formats/      the wire schema: requests, replies, KServe v2, the seeds' APIs, decode, encode, value checks
  attribution/  the engine: path integrals in chunks, quadrature rules, the IDG segment hierarchy
  networks/     the architectures and their checkpoint readers (plain PyTorch, or the one framework each needs)
  adapters/     one per kind of model: prepare an image, predict, plan what to explain
  serving/      the request options, the settings, jobs, and the service's verbs: decode -> run -> encode
  archives/     what each TorchServe archive serves, its model-config, and how it is built
  clients/      the command line, the gateway to the seeds' APIs, the DEXTR bridges, rendering, readiness

Nothing here imports TorchServe: handlers/attribution_handler.py adapts the service to it.
"""
