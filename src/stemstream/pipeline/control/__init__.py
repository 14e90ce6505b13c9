"""pipeline/control"""
