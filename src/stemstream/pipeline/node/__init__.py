"""pipeline/node"""
