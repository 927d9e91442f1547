"""Layer 1: running generated programs and scoring them (sandbox, pass@k, BLEU); imports only layer 0."""
