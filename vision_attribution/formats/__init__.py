"""Request and reply formats: requests.py (what a client may send) and replies.py (what it gets back)."""
