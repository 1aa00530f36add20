"""slimgraph.frontends"""
