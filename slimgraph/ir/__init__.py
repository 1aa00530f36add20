"""slimgraph.ir"""
