"""Inference backends behind one small engine interface."""
