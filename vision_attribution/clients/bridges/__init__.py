"""The DEXTR seed's two serving modes as client commands, in front of TorchServe's /predictions/dextr:
redis_channel.py (`vision-attribution dextr-redis`: a Redis request/reply channel) and folder_poll.py
(`vision-attribution dextr-poll`: a watched folder). endpoint.py sends their requests with the token."""
