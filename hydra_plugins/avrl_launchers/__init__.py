"""avrl's Hydra launchers (Hydra finds plugins in the hydra_plugins package)."""
