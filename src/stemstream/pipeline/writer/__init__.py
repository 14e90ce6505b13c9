"""pipeline/writer"""
