"""Exploration: ensemble MD, model deviation, bias potentials, blow-up guards."""
