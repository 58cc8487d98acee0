"""Rank, world size and device from the launcher's environment (env.py), and the launcher command lines
(launch.py). Nothing here launches processes itself; the engines live in fastvit_pt.engines."""
