"""The check catalogue, one module per category (the report lists them in this order)."""
