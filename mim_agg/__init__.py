"""mim_agg: how should the tokens of a frozen Vision Transformer be aggregated?"""

__version__ = "0.1.0"
