"""``repgeo lens``: decode every layer's hidden states through the model's output and input embeddings."""
