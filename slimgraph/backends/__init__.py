"""slimgraph.backends"""
