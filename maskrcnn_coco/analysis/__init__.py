"""Reading finished runs back: the epoch history by tag, the sweep objective and sweep summaries."""
