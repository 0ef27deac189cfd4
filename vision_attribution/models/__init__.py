"""Model adapters and the model definitions they load; a framework import lives in its model's module only."""
