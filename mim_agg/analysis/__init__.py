"""The paper's diagnostics: per-block attention statistics and the figures that show them."""
