"""Serving: requests of one row each, stepped together (`batcher`), checked against the export's
request contract (`requests`); `omnicache-export serve` puts it behind PyTriton (`cli/serve.py`)."""
