"""The seeds' own HTTP APIs in front of TorchServe, so that a seed's client works with only the URL changed.

server.py: the ASGI apps (MAX Image Segmenter's routes and Swagger UI on one port, each Flask seed's
POST /model/ on its own port), upload limit, CORS, and the `vision-attribution gateway` command;
torchserve.py: forwarding to TorchServe with its token, timeouts, and why TorchServe could not answer;
swagger.py: the Swagger 2.0 descriptions and the Swagger UI page. The routes' fields and strings are in
formats/seed_apis.py. Nothing here imports torch.
"""
