"""Layer 2: the losses and their parts: feature-matching rewards, baselines and advantages, policy-gradient
and CE terms, the EBFT update, verifiable rewards; imports layers 0-1."""
