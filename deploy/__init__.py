"""Deployment on Flower's Deployment Engine: federation certificates and site checks."""
