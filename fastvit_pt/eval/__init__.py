"""Evaluation: importing backbones from any checkpoint layout, exporting them for timm, k-NN."""
