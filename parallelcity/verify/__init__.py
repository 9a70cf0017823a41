"""Verification: rigs, the verifier and offline campaigns."""
