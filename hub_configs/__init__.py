"""Calibrated KVQuant configs shipped with the package (data only); see index.json and README.md here."""
