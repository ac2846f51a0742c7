"""Callbacks: prediction CSV, running-stat and input checks, activation stats, precise BN."""
