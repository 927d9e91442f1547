"""Layer 4: the LightningModules of SFT, EBFT and RLVR; imports layers 0-3 (never ``ebft.eval``)."""
